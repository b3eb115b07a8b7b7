"""MT-GRPO in the demo: the ratio-preserving sampler, the rewards and improvements it reports, the method in
``python -m balancer.demo.compare``."""

from __future__ import annotations

import json

import pytest
import torch

from balancer import Balancer
from balancer.demo import compare
from balancer.demo.grpo import GRPOConfig, Rollouts, prompt_counts, train
from balancer.demo.mt_grpo import RP_ROUNDS, ratio_preserving_rollout
from balancer.demo.tasks import NATURE_TASKS
from balancer.tools.metrics import read_metrics

TINY = GRPOConfig(steps=4, prompts=4, rollouts=4, sampling="ratio_preserving")


def _fake_draw(informative_per_round):
    """A ``draw`` whose round r has ``informative_per_round[r]`` prompts with a reward spread (first ones)."""
    rounds = iter(informative_per_round)

    def draw(tasks, index, n, group, generator):
        good = next(rounds)
        rewards = torch.zeros(n, group)
        rewards[:good, 0] = 1.0  # one right answer: a spread, non-zero advantages
        advantages = torch.where(rewards.std(dim=1, keepdim=True) > 0, rewards - rewards.mean(1, keepdim=True), 0.0)
        tag = torch.arange(n).repeat_interleave(group)[:, None] + 100 * draw.calls  # which round and prompt
        draw.calls += 1
        return Rollouts(
            tag, tag, torch.zeros(n * group, 1), rewards.reshape(-1), advantages.reshape(-1), torch.tensor(0.0)
        )

    draw.calls = 0
    return draw


def _opt():
    return Balancer(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1), plugins=[("mt_grpo", {})])


@pytest.mark.parametrize(
    ("rounds", "drawn", "informative"),
    [([6, 6], 6, 6), ([2, 1, 0, 2, 9], 30, 6), ([0] * RP_ROUNDS, 6 * RP_ROUNDS, 0), ([1] * RP_ROUNDS, 36, 6)],
)
def test_the_sampler_draws_until_the_task_has_its_informative_prompts(rounds, drawn, informative):
    opt = _opt()
    batch, n = ratio_preserving_rollout(
        _fake_draw(rounds), opt, NATURE_TASKS, 0, 6, 4, torch.Generator().manual_seed(0)
    )
    assert n == drawn
    assert batch.responses.shape[0] == 6 * 4
    per_prompt = batch.advantages.view(6, 4).abs().sum(dim=1) > 0
    assert int(per_prompt.sum()) == informative
    tags = batch.context[::4, 0].tolist()
    assert len(set(tags)) == 6  # no prompt twice
    # every round's mean reward (float32) went into the EMA J (factor 0.5, from 0)
    j = 0.0
    for good in rounds[: n // 6]:
        j = 0.5 * j + 0.5 * min(good, 6) / (6 * 4)
    state = opt.plugin_states["mt_grpo"]
    assert state["names"] == [NATURE_TASKS[0].name]
    torch.testing.assert_close(
        state["reward"], torch.tensor([j], dtype=torch.float64), rtol=1e-6, atol=1e-9
    )  # float32 means


def test_a_run_samples_by_the_plugins_ratios_and_reports_improvements():
    records = []
    plugins = [("mt_grpo", {"apply": "sampling", "lr": 0.5})]
    train(NATURE_TASKS, plugins, TINY, 0, lambda opt, step, extra: records.append((opt.plugin_states, extra)))
    assert len(records) == TINY.steps
    for step, (_, extra) in enumerate(records):
        assert sum(extra["prompts"].values()) == 3 * TINY.prompts
        assert all(extra["generated"][t] >= extra["prompts"][t] for t in extra["prompts"])
        assert sum(extra["z"].values()) == pytest.approx(1.0)
        if step % TINY.minibatches == 0 and step > 0:  # a phase starts: counts from the ratios after the last step
            z = records[step - 1][1]["z"]
            expected = prompt_counts([z[t.name] for t in NATURE_TASKS], TINY.prompts)
            assert [extra["prompts"][t.name] for t in NATURE_TASKS] == expected
    states = records[-1][0]["split_half"]["mt_grpo"]
    assert states["steps"].tolist() == [float(TINY.steps)] * 3  # one logit step per optimizer step
    assert not torch.equal(states["logits"], torch.zeros(3, dtype=torch.float64))


def test_ratio_preserving_sampling_needs_the_plugin():
    with pytest.raises(ValueError, match="'mt_grpo' plugin"):
        train(NATURE_TASKS, ["task_norm"], TINY, 0, lambda *a: None)


def test_compare_runs_mt_grpo_and_reuses_stored_runs(tmp_path, capsys):
    first, second = tmp_path / "plain", tmp_path / "mt"
    assert compare.main(["--seeds", "1", "--steps", "2", "--methods", "plain", "--out", str(first)]) == 0
    args = ["--seeds", "1", "--steps", "2", "--methods", "mt_grpo", "--out", str(second)]
    assert compare.main([*args, "--reuse", str(first / "summary.json")]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("mt_grpo ") for line in out.splitlines())
    dump = json.loads((second / "summary.json").read_text())
    assert set(dump) == {"plain", "mt_grpo"}
    assert sorted(read_metrics(second / "compare.jsonl")) == ["mt_grpo/0"]  # plain was not run again
