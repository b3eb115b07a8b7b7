"""DPO's chosen/rejected gradient imbalance, and what the ``balanced_dpo`` rules do about it.

Ma et al., *Gradient Imbalance in Direct Preference Optimization* (Balanced-DPO, arXiv
2502.20847) analyse DPO in a discrete response space; their exact reweighting could not be
obtained, so this compares plain DPO with the rules the ``balanced_dpo`` plugin implements (see
its docstring): ``"norm"`` (equal chosen/rejected parameter-gradient norms) and ``"prob"``
(``min(C, π_w/π_l)`` per pair at the log-prob taps, C = 2) on the chosen side, with and without
the floor 1/C, or ``clamp(π_l/π_w, 1/C, C)`` on the rejected side. Same seeds, start, batches and
optimizer (Adam) for every method; hyperparameters are those of the earlier version of this
experiment, not tuned.

Settings (pieces in ``dpo_setups/``):

1. ``disjoint β=0.1`` and ``disjoint β=1`` (main): a log-linear policy over 8 prompts × 64
   responses; of the 16 responses ``π_ref`` likes most, the best 8 by hidden reward form the
   chosen set C and the worst 8 the rejected set R; pairs (y_w ∈ C, y_l ∈ R). Exact metrics:
   mass on C, ``E_π[r*]``, ``KL(π‖π_ref)``, the best ``E[r*]`` any policy reaches at the same KL
   (``π_λ ∝ π_ref exp(λ r*)``), and the implicit reward ``β log(π/π_ref)`` of the 48 responses in
   neither set against their true reward (correlation, centred per prompt).
2. ``autoregressive β=0.1`` (the earlier setting): a GRU language model pretrained into ``π_ref``,
   pairs sampled from ``π_ref`` and labelled by Bradley–Terry; Monte Carlo reward and KL.

It also measures, without training, the confound of the earlier discrete setting (pairs from the
16 responses labelled by Bradley–Terry): how many chosen responses are also rejected, and what
the ideal policy ``π*`` does to the chosen log-probs.

Run (one thread: about 6.5 minutes of CPU time, more wall time on a shared machine; ``--quick``: seconds)::

    python examples/experiments/dpo_imbalance.py --plot docs/dpo-imbalance.png

Prints per setting a table (mean ± sd over seeds) and a paired table (rule − DPO, same seed);
writes ``OUT/results.json`` (every run's curves and gradient statistics) and the figure. The same
seeds give byte-identical JSON (one thread, deterministic algorithms).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from dpo_setups.autoregressive import Autoregressive, AutoregressiveTask
from dpo_setups.discrete import Discrete, DiscreteTask
from dpo_setups.report import mean_sd, plot, summarize, tables
from dpo_setups.training import METHODS, describe, run_setting

BETAS = (0.1, 1.0)
AR_BETA = 0.1
QUICK_DISCRETE = Discrete(steps=60, pairs=400, eval_every=10)
QUICK_AR = Autoregressive(pretrain_steps=20, pairs=128, steps=20, eval_every=10, mc_samples=32)


def confound(cfg: Discrete, seeds: int) -> dict[str, Any]:
    """The earlier discrete setting (overlapping pairs), untrained: overlap and what π* does."""
    out: dict[str, Any] = {}
    for beta in BETAS:
        rows = [describe(DiscreteTask(cfg, seed, beta, pairing="overlap")) for seed in range(seeds)]
        for row in rows:
            row["ideal_delta_logp_chosen"] = row["ideal_logp_chosen"] - row["start_logp_chosen"]
        keys = ("chosen_overlap", "ideal_delta_logp_chosen", "start_ood_mass", "ideal_ood_mass", "ideal_kl")
        out[f"beta={beta:g}"] = {k: mean_sd([r[k] for r in rows]) for k in keys}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 seeds: a smoke test of the pipeline")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 5, or 2 with --quick)")
    parser.add_argument("--out", type=Path, default=Path("dpo-imbalance"), help="folder for results.json")
    parser.add_argument("--plot", type=Path, default=None, help="figure path (default OUT/dpo-imbalance.png)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (results depend on it)")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    discrete = QUICK_DISCRETE if args.quick else Discrete()
    autoregressive = QUICK_AR if args.quick else Autoregressive()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for beta in BETAS:
        name = f"disjoint β={beta:g}"
        results[name] = run_setting(lambda s, b=beta: DiscreteTask(discrete, s, b), discrete, seeds, 1e-9, name)
        results[name]["beta"] = beta
    name = f"autoregressive β={AR_BETA:g}"
    results[name] = run_setting(
        lambda s: AutoregressiveTask(autoregressive, s, AR_BETA), autoregressive, seeds, 1e-4, name
    )
    results[name]["beta"] = AR_BETA
    for name, result in results.items():
        result["stats"] = summarize(result)
        cfg = result["config"]
        print(f"\n### {name}: {seeds} seeds, {cfg['steps']} Adam steps (lr {cfg['lr']}), batch {cfg['batch']}\n")
        print(tables(result))
    check = confound(discrete, seeds)
    print("\n### earlier discrete setting (overlapping pairs), untrained\n")
    for beta, values in check.items():
        print(f"{beta}: " + ", ".join(f"{k} = {v[0]:.2f} ± {v[1]:.2f}" for k, v in values.items()))
    seconds = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    out = {
        "seeds": seeds,
        "quick": args.quick,
        "threads": args.threads,
        "methods": METHODS,
        "discrete": dataclasses.asdict(discrete),
        "settings": results,
        "overlap_setting": check,
    }
    (args.out / "results.json").write_text(json.dumps(out, sort_keys=True, allow_nan=True) + "\n")
    figure = args.plot or args.out / "dpo-imbalance.png"
    plot(results, figure)
    print(f"\nTraining and evaluation: {seconds:.0f} s\nResults: {args.out / 'results.json'}\nFigure:  {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
