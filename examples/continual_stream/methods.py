"""ER and GSA's objective, one online pass, with the ``replay_bias`` plugin measuring or weighting.

GSA's recipe (Guo, Liu, Zhao, CVPR 2023; batch sizes from its released CIFAR-100 script): stream
batch 10; two views of every row; a softmax over the growing head (the classes of all tasks so
far, later ones masked); Adam lr 1e-3, betas (0.9, 0.99); the weights 1 for the first 5 batches
of each task (``ReplayBias.start_task`` at every task boundary). GSA's weight decay 1e-4 is left
out: Adam normalises the decay gradient, so the masked head rows, which get no other gradient,
would drift by about lr a step. Methods, all on the same seeds:

* ``er``: cross-entropy over the head on the stream batch plus 64 rows replayed uniformly;
* ``gsa_w1``: GSA's objective ``2·L_bal + L_new`` with every weight 1. ``L_new``: cross-entropy
  over the current task's classes only, on the stream batch plus 22 current-task memory rows.
  ``L_bal``: cross-entropy over the head on a class-balanced batch of 64, a share
  ``ρ = current-task classes / head classes`` of current-task rows and the rest old-task memory;
* ``gsa``: the same with ``L_bal``'s rows weighted by ``replay_bias`` (``2·σ(ANT_y − 1)``).

The plugin runs in all three (``groups=()``: measure only) so ANT is measured alike.
"""

from __future__ import annotations

import math
import statistics
import warnings

import torch
import torch.nn.functional as F

from balancer import Balancer, BalancerWarning
from balancer.plugins import ReplayBias
from balancer.recipes.continual import ReservoirBuffer, mask_unseen

from .streams import CLASSES, PER_TASK, TASKS, Stream, two_views

STREAM_BATCH, REPLAY, BALANCED, CURRENT_REPLAY, WARMUP = 10, 64, 64, 22, 5
METHODS = {"er": "ER", "gsa_w1": "GSA objective, weights 1", "gsa": "GSA objective + replay_bias"}
TRACE_EVERY = 25  # steps between two samples of the per-class ANT trace


def make_model(inputs: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(inputs, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, CLASSES),
    )  # fmt: skip


def train_step(method, model, opt, memory, x, y, task, head, shift, gen):
    """One online step; the raw stream batch enters the memory afterwards (as in GSA and ER)."""
    tag = lambda n, g: [g] * n  # noqa: E731
    if method == "er":
        rx, ry, _ = memory.sample(REPLAY) if len(memory) else (x[:0], y[:0], None)
        bx, by = two_views(torch.cat([x, rx]), torch.cat([y, ry]), shift, gen)
        logits = opt.tap(mask_unseen(model(bx), head), tag(len(by), "batch"), labels=by)
        loss = F.cross_entropy(logits, by)
    else:
        lo = task * PER_TASK
        cx, cy, _ = memory.sample(CURRENT_REPLAY, task=task) if len(memory) else (x[:0], y[:0], None)
        nx, ny = torch.cat([x, cx]), torch.cat([y, cy])
        vx, vy = two_views(nx, ny, shift, gen)
        loss = F.cross_entropy(model(vx)[:, lo : lo + PER_TASK], vy - lo)  # L_new: current classes only
        if len(memory):
            rate = PER_TASK / head.sum().item()
            ox, oy, _ = memory.sample(int(BALANCED * (1 - rate)), exclude_task=task)
            n_cur = int(BALANCED * rate)
            order = torch.randperm(len(ny), generator=gen)[:n_cur]
            bx, by = two_views(torch.cat([ox, nx[order]]), torch.cat([oy, ny[order]]), shift, gen)
            logits = opt.tap(mask_unseen(model(bx), head), tag(len(by), "batch"), labels=by)
            loss = 2 * F.cross_entropy(logits, by) + loss  # L_bal, rows weighted at the tap (gsa)
    loss.backward()
    with warnings.catch_warnings():  # GSA's very first step has no L_bal: the plugin has no tap, by design
        if not len(memory):
            warnings.filterwarnings("ignore", "step\\(\\) ran with plugins", BalancerWarning)
        opt.step()
    opt.zero_grad()
    memory.add(x, y, task)


@torch.no_grad()
def task_accuracies(model, data: Stream, head):
    pred = mask_unseen(model(data.x_test), head).argmax(1)
    y = data.y_test
    per_task = [(pred[y // PER_TASK == t] == y[y // PER_TASK == t]).float().mean().item() for t in range(TASKS)]
    old = y < CLASSES - PER_TASK
    confusion = (pred[old] >= CLASSES - PER_TASK).float().mean().item()  # old samples called newest-task classes
    return per_task, confusion


def run(method: str, data: Stream, seed: int, memory_size: int) -> dict:
    torch.manual_seed(seed)
    model = make_model(data.x_train.shape[1])
    plugin = {"warmup": WARMUP} if method == "gsa" else {"warmup": WARMUP, "groups": []}  # []: measure only
    adam = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99), foreach=True)  # GSA's, without weight decay
    opt = Balancer(adam, plugins=[("replay_bias", plugin)])
    gen = torch.Generator().manual_seed(seed)
    memory = ReservoirBuffer(memory_size, generator=gen)
    head = torch.zeros(CLASSES, dtype=torch.bool)
    acc, ant_trace, weights = [], [], {"old": [], "new": []}
    for task in range(TASKS):
        ReplayBias.start_task(opt)  # the warm-up: the first WARMUP batches of each task
        lo = task * PER_TASK
        head[lo : lo + PER_TASK] = True  # the head grows by the task's classes
        idx = torch.nonzero(data.y_train // PER_TASK == task).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        for step, batch in enumerate(idx.split(STREAM_BATCH)):
            train_step(
                method, model, opt, memory, data.x_train[batch], data.y_train[batch], task, head, data.shift, gen
            )
            metrics = opt.plugin_metrics()["replay_bias"]
            if step % TRACE_EVERY == 0:
                ant = metrics["ant"].clamp(max=1e3).tolist()
                ant_trace.append([task, step, *ant, *[math.nan] * (CLASSES - len(ant))])
            if task and step >= WARMUP:  # the weight the next batch's rows get, per class
                weight = metrics["weight"]
                weights["old"].append(weight[:lo].mean().item())
                weights["new"].append(weight[lo : lo + PER_TASK].mean().item())
        acc.append(task_accuracies(model, data, head)[0])
    final, confusion = task_accuracies(model, data, head)
    ant = opt.plugin_metrics()["replay_bias"]["ant"]
    return {
        "final_accuracy": statistics.fmean(final),
        "forgetting": statistics.fmean(
            max(acc[t][j] for t in range(j, TASKS - 1)) - final[j] for j in range(TASKS - 1)
        ),
        "old_accuracy": statistics.fmean(final[:-1]),
        "new_accuracy": final[-1],
        "old_new_confusion": confusion,
        "accuracy_matrix": acc,
        "ant_old_final": ant[: CLASSES - PER_TASK].mean().item(),
        "ant_new_final": ant[CLASSES - PER_TASK :].mean().item(),
        "weight_old": statistics.fmean(weights["old"]),
        "weight_new": statistics.fmean(weights["new"]),
        "weight_new_max": max(weights["new"]),
        "weight_old_min": min(weights["old"]),
        "ant_trace": [[math.nan if v != v else v for v in row] for row in ant_trace],
    }
