"""``python -m balancer.demo.compare``: every method on the same seeds, paired differences to plain."""

from __future__ import annotations

import json

import pytest

from balancer.demo import compare
from balancer.demo.grpo import GRPOConfig
from balancer.tools.metrics import read_metrics

TINY = GRPOConfig(steps=4, prompts=4, rollouts=4)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    methods = ["plain", "grad_sampling", "task_norm_split_half"]
    return out, compare.compare(methods, [0, 1], "nature", TINY, out)


def test_every_method_and_seed_is_logged_and_summarised(compared):
    out, summaries = compared
    runs = read_metrics(out / "compare.jsonl")
    assert sorted(runs) == sorted(f"{m}/{s}" for m in summaries for s in (0, 1))
    for name, records in runs.items():
        assert len(records) == TINY.steps
        weights = [r["weights"] for r in records]
        assert all(w[0::2] == w[1::2] for w in weights)  # both halves of a task weighed alike
        if name.startswith(("plain", "grad_sampling")):
            assert all(x == 1.0 for w in weights for x in w)
        total = [sum(r["extra"]["prompts"].values()) for r in records]
        assert total == [3 * TINY.prompts] * TINY.steps
    # the first phase is sampled uniformly, so the first step of every method is the same
    assert runs["plain/0"][0]["extra"]["reward"] == runs["grad_sampling/0"][0]["extra"]["reward"]


def test_the_table_pairs_each_method_with_plain_on_the_same_seeds(compared):
    _, summaries = compared
    lines = compare.table(summaries).splitlines()
    plain = next(line for line in lines if line.startswith("plain "))
    assert plain.split()[-7:-1] == ["0.00", "±", "0.00"] * 2  # plain minus plain, every seed
    worst = [summaries["task_norm_split_half"][s].worst_final - summaries["plain"][s].worst_final for s in (0, 1)]
    row = next(line for line in lines if line.startswith("task_norm_split_half"))
    assert f"{sum(worst) / 2:.2f} ± " in row


def test_main_writes_the_summary_and_refuses_unknown_methods(tmp_path, capsys):
    args = ["--seeds", "1", "--steps", "2", "--methods", "plain,famo", "--out", str(tmp_path)]
    assert compare.main(args) == 0
    assert "Setting 'nature', 1 seeds, 2 steps per run" in capsys.readouterr().out
    dump = json.loads((tmp_path / "summary.json").read_text())
    assert set(dump) == {"plain", "famo"} and set(dump["famo"]) == {"0"}
    assert compare.main(["--summary", str(tmp_path / "summary.json")]) == 0  # the tables again, no training
    again = capsys.readouterr().out
    assert again.splitlines()[1].startswith("plain ") and "rho(|g|^2, next gain)" in again
    with pytest.raises(SystemExit):
        compare.main(["--methods", "plain,nope", "--out", str(tmp_path)])
    assert "unknown methods ['nope']" in capsys.readouterr().err
