"""Online class-incremental learning on sklearn's digits: does GSA's replay-bias weight help ER?

Guo, Liu, Zhao, *Dealing with Cross-Task Class Discrimination in Online Continual Learning*
(GSA, CVPR 2023). The 8x8 digits (bundled with scikit-learn, no download) arrive as 5 tasks of 2
classes, each seen once in batches of 10. A 64-128-128-10 MLP with a fixed head (unseen classes
masked at -inf), a reservoir memory of 100 samples, Adam lr 1e-3 with betas (0.9, 0.99) as in
GSA's code but without its L2 weight decay: Adam normalises the decay gradient, so the head rows
of unseen classes, which get no other gradient, would move by about lr per step. Methods:

* ``finetune``: cross-entropy over the seen classes on the stream batch, no replay;
* ``er``: the same on the stream batch plus 32 samples replayed uniformly from the memory;
* ``er_rb``: ER with every row weighted by ``replay_bias`` (the plugin dropped into an ER loop);
* ``gsa``: GSA's objective ``2·L_bal + L_new``. ``L_new`` is a cross-entropy over the current
  task's classes only, on the stream batch plus 10 current-task memory samples. ``L_bal`` is a
  cross-entropy over all seen classes on a class-balanced batch of 32: a share ``ρ`` (current
  task's classes / seen classes) of current-task rows, the rest old-task memory samples. Its
  rows are weighted by ``2·σ(ANT_y − 1)`` by the ``replay_bias`` plugin at a logits tap;
* ``gsa_w1``: the same objective with every weight 1 (the plugin only measures ANT): isolates
  the weighting.

GSA's batch of 64 with 22 current-task memory samples and memory 1000 is scaled to 32 and 10
with memory 100; no augmentation (flipping digits changes them). The plugin also runs, without
reweighting, in ``finetune`` and ``er`` to measure ANT on their training batches.

Run: ``python examples/online_continual.py`` (about a minute on 2 CPU cores; ``--quick`` for a
smoke run). Writes a JSON of every number and a plot of accuracy over the stream.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from balancer import Balancer
from balancer.recipes.continual import ReservoirBuffer, mask_unseen

TASKS, PER_TASK, CLASSES = 5, 2, 10
STREAM_BATCH, MEMORY, REPLAY, BALANCED, CURRENT_REPLAY = 10, 100, 32, 32, 10
METHODS = {
    "finetune": "fine-tune",
    "er": "ER",
    "er_rb": "ER, rows weighted",
    "gsa": "ER + replay_bias (GSA)",
    "gsa_w1": "GSA, weights = 1",
}
COLORS = {"finetune": "tab:gray", "er": "tab:blue", "er_rb": "tab:cyan", "gsa": "tab:green", "gsa_w1": "tab:red"}


def load_stream(seed: int) -> dict[str, torch.Tensor]:
    """Digits with a seed-dependent class order (task t holds classes 2t, 2t+1) and 70/30 split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    relabel = np.empty(CLASSES, dtype=np.int64)
    relabel[rng.permutation(CLASSES)] = np.arange(CLASSES)
    y = relabel[y]
    train = np.zeros(len(y), dtype=bool)
    for c in range(CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))
        train[idx[: int(0.7 * len(idx))]] = True
    tensor = lambda a, dt: torch.tensor(a, dtype=dt)  # noqa: E731
    data = {"x": tensor(x / 16.0, torch.float32), "y": tensor(y, torch.long)}
    return {
        f"{k}_{s}": v[tensor(mask, torch.bool)]
        for k, v in data.items()
        for s, mask in (("train", train), ("test", ~train))
    }


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, CLASSES),
    )


def train_step(method, model, opt, memory, x, y, task, seen):
    """One online step; the stream batch enters the memory afterwards."""
    tag = lambda n, g: [g] * n  # noqa: E731
    if method == "finetune":
        logits = opt.tap(mask_unseen(model(x), seen), tag(len(y), "current"), labels=y)
        loss = F.cross_entropy(logits, y)
    elif method in ("er", "er_rb"):
        rx, ry, _ = memory.sample(REPLAY) if len(memory) else (x[:0], y[:0], None)
        bx, by = torch.cat([x, rx]), torch.cat([y, ry])
        logits = opt.tap(mask_unseen(model(bx), seen), tag(len(y), "current") + tag(len(ry), "replay"), labels=by)
        loss = F.cross_entropy(logits, by)
    else:
        lo = task * PER_TASK
        cx, cy, _ = memory.sample(CURRENT_REPLAY, task=task) if len(memory) else (x[:0], y[:0], None)
        nx, ny = torch.cat([x, cx]), torch.cat([y, cy])
        loss = F.cross_entropy(model(nx)[:, lo : lo + PER_TASK], ny - lo)  # L_new: current classes only
        if len(memory):
            rate = seen[lo : lo + PER_TASK].sum().item() / seen.sum().item()
            ox, oy, _ = memory.sample(int(BALANCED * (1 - rate)), exclude_task=task)
            n_cur = int(BALANCED * rate)
            bx, by = torch.cat([ox, nx[:n_cur]]), torch.cat([oy, ny[:n_cur]])
            groups = tag(len(oy), "replay") + tag(len(by) - len(oy), "current")
            logits = opt.tap(mask_unseen(model(bx), seen), groups, labels=by)
            loss = 2 * F.cross_entropy(logits, by) + loss  # L_bal, rows weighted at the tap
    loss.backward()
    opt.step()
    opt.zero_grad()
    memory.add(x, y, task)


@torch.no_grad()
def task_accuracies(model, data, seen):
    pred = mask_unseen(model(data["x_test"]), seen).argmax(1)
    y = data["y_test"]
    per_task = [(pred[y // PER_TASK == t] == y[y // PER_TASK == t]).float().mean().item() for t in range(TASKS)]
    old = y < CLASSES - PER_TASK
    confusion = (pred[old] >= CLASSES - PER_TASK).float().mean().item()  # old samples called newest-task classes
    return per_task, confusion


def run(method: str, seed: int) -> dict:
    data = load_stream(seed)
    torch.manual_seed(seed)
    model = make_model()
    plugin = {"warmup": 5} if method in ("gsa", "er_rb") else {"warmup": 5, "groups": []}  # []: measure only
    adam = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))  # GSA's, without weight decay
    opt = Balancer(adam, plugins=[("replay_bias", plugin)])
    gen = torch.Generator().manual_seed(seed)
    memory = ReservoirBuffer(MEMORY, generator=gen)
    seen = torch.zeros(CLASSES, dtype=torch.bool)
    acc, ant_old, ant_new, ant_trace = [], [], [], []
    for task in range(TASKS):
        idx = torch.nonzero(data["y_train"] // PER_TASK == task).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        ant_trace.append([])
        for batch in idx.split(STREAM_BATCH):
            x, y = data["x_train"][batch], data["y_train"][batch]
            seen[y] = True
            train_step(method, model, opt, memory, x, y, task, seen)
            ant = opt.plugin_metrics()["replay_bias"]["ant"]
            lo = task * PER_TASK
            new = ant[lo : lo + PER_TASK].clamp(max=1e6).nanmean().item()
            old = ant[:lo].clamp(max=1e6).nanmean().item() if task else math.nan
            ant_trace[-1].append((old, new))
            if task:
                ant_old.append(old)
                ant_new.append(new)
        acc.append(task_accuracies(model, data, seen)[0])
    final, confusion = task_accuracies(model, data, seen)
    forgetting = [max(acc[t][j] for t in range(j, TASKS - 1)) - final[j] for j in range(TASKS - 1)]
    seen_acc = [statistics.fmean(acc[t][: t + 1]) for t in range(TASKS)]
    return {
        "final_accuracy": statistics.fmean(final),
        "forgetting": statistics.fmean(forgetting),
        "old_new_confusion": confusion,
        "accuracy_seen_after_task": seen_acc,
        "accuracy_old_after_task": [statistics.fmean(acc[t][:t]) if t else math.nan for t in range(TASKS)],
        "accuracy_new_after_task": [acc[t][t] for t in range(TASKS)],
        "accuracy_matrix": acc,
        "ant_old": statistics.fmean(ant_old),
        "ant_new": statistics.fmean(ant_new),
        "ant_trace": ant_trace,
    }


def mean_std(values):
    values = [v for v in values if not math.isnan(v)]
    return (
        (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0) if values else (math.nan,) * 2
    )


def summarize(runs: dict[str, list[dict]]) -> dict:
    keys = ("final_accuracy", "forgetting", "old_new_confusion", "ant_old", "ant_new")
    out = {}
    for method, rs in runs.items():
        row = {k: mean_std([r[k] for r in rs]) for k in keys}
        for k in ("accuracy_seen_after_task", "accuracy_old_after_task", "accuracy_new_after_task"):
            row[k] = [mean_std([r[k][t] for r in rs]) for t in range(TASKS)]
        out[method] = row
    # paired over seeds (same class order, split, init, stream order and memory draws)
    for a, b in (("gsa", "er"), ("gsa", "gsa_w1"), ("er_rb", "er")):
        if a in runs and b in runs:
            for k in ("final_accuracy", "forgetting"):
                diff = [x[k] - y[k] for x, y in zip(runs[a], runs[b], strict=True)]
                out.setdefault("paired", {})[f"{a} - {b}: {k}"] = mean_std(diff)
    return out


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    tasks = np.arange(1, TASKS + 1)
    for method, rs in runs.items():
        a = np.array([r["accuracy_seen_after_task"] for r in rs])
        mean, std = a.mean(0), a.std(0)
        left.plot(tasks, mean, marker="o", color=COLORS[method], label=METHODS[method])
        left.fill_between(tasks, mean - std, mean + std, color=COLORS[method], alpha=0.15)
    left.set(xlabel="after task", ylabel="accuracy over seen classes", title="Accuracy over the stream", xticks=tasks)
    left.legend()
    for method in ("gsa_w1", "gsa"):
        if method not in runs:
            continue
        # seeds differ by a step or two per task: keep each task's first common steps
        steps = [min(len(r["ant_trace"][t]) for r in runs[method]) for t in range(TASKS)]
        per_seed = [sum((r["ant_trace"][t][: steps[t]] for t in range(TASKS)), []) for r in runs[method]]
        with warnings.catch_warnings():  # no old classes during the first task: an all-NaN column
            warnings.simplefilter("ignore", RuntimeWarning)
            trace = np.nanmean(np.array(per_seed, dtype=float).clip(max=10), axis=0)
        right.plot(trace[:, 0], color=COLORS[method], label=f"{METHODS[method]}: old classes")
        right.plot(trace[:, 1], color=COLORS[method], linestyle="--", label=f"{METHODS[method]}: new classes")
    right.axhline(1.0, color="gray", linewidth=0.8)
    right.set(xlabel="step", ylabel="ANT (pull-up / push-down)", title="Training bias (whole-stream sums)")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _finite(value):
    """NaN/inf (e.g. old-class accuracy after the first task) as JSON null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    parser.add_argument("--quick", action="store_true", help="2 seeds: a smoke run")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--json", type=Path, default=Path("online-continual/results.json"))
    parser.add_argument("--plot", type=Path, default=Path("online-continual/accuracy.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a tiny MLP: threads only add synchronisation
    seeds = range(2 if args.quick else args.seeds)
    runs = {m: [run(m, s) for s in seeds] for m in args.methods}
    summary = summarize(runs)
    print(f"{'method':<26}{'final acc':>16}{'forgetting':>16}{'old->new conf.':>16}{'ANT old':>14}{'ANT new':>14}")
    for m in args.methods:
        row = summary[m]
        cells = [f"{row[k][0]:.3f} ± {row[k][1]:.3f}" for k in ("final_accuracy", "forgetting", "old_new_confusion")]
        ants = [f"{row[k][0]:.2f} ± {row[k][1]:.2f}" for k in ("ant_old", "ant_new")]
        print(f"{METHODS[m]:<26}" + "".join(f"{c:>16}" for c in cells) + "".join(f"{c:>14}" for c in ants))
    for name, (mean, std) in summary.get("paired", {}).items():
        print(f"paired {name}: {mean:+.3f} ± {std:.3f}")
    result = {"config": {"seeds": len(seeds), "methods": args.methods}, "summary": summary, "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_finite(result), indent=1))
    plot(runs, args.plot)
    return result


if __name__ == "__main__":
    main()
