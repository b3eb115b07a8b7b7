"""Multi-task training under DeepSpeed ZeRO-2 with per-task gradient balancing (``task_norm``).

Three regression tasks share a trunk; each has its own head. Their targets differ in scale by
100x, so without balancing the "loud" task's gradient is ~100x the "quiet" one's and dominates
the shared trunk (Wu et al., *Imbalanced Gradients in RL Post-Training of Multi-Task LLMs*).
``task_norm`` rescales each task's (rank-averaged) gradient to the mean norm before
``engine.step()``. The config, including the ``"balancer"`` section, is
``examples/deepspeed_multitask.json``.

Run on CPU (2 processes, gloo)::

    torchrun --nproc_per_node 2 examples/deepspeed_multitask.py

Rank 0 prints, every few steps, each task's loss (on rank 0's share of the batch), its gradient
norm before balancing (over the global batch) and the weight it got; the weighted norms
``w_k * |g_k|`` come out equal (``beta: 0`` in the config: this step's norms, no EMA).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import torch
import torch.distributed as dist

from balancer.integrations.deepspeed import initialize

TASKS = {"quiet": 0.1, "medium": 1.0, "loud": 10.0}  # target scale of each task
STEPS, PRINT_EVERY, BATCH = 60, 10, 16
CONFIG = Path(__file__).with_suffix(".json")


class MultiTaskNet(torch.nn.Module):
    def __init__(self, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(hidden, 1) for name in TASKS})

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](torch.tanh(self.trunk(x))).squeeze(-1)


def task_batch(task: str, step: int, rank: int, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the task's batch: a fixed random linear function, scaled per task."""
    index = list(TASKS).index(task)
    direction = torch.randn(dim, generator=torch.Generator().manual_seed(100 + index))
    gen = torch.Generator().manual_seed(10_000 * index + 100 * step + rank)
    x = torch.randn(BATCH, dim, generator=gen)
    return x, TASKS[task] * (x @ direction) / dim**0.5


def main() -> None:
    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed()
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = MultiTaskNet()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, opt, _, _ = initialize(model=model, optimizer=adamw, config=str(CONFIG))
    if rank == 0:
        print(f"world size {dist.get_world_size()}, ZeRO stage {engine.zero_optimization_stage()}, plugins {opt}")
    for step in range(1, STEPS + 1):
        losses = {}
        for task in TASKS:
            with opt.group(task):
                x, y = task_batch(task, step, rank)
                loss = torch.nn.functional.mse_loss(engine(x, task), y)
                engine.backward(loss)
            losses[task] = loss.detach()
        opt.step()
        opt.zero_grad()
        if rank == 0 and (step % PRINT_EVERY == 0 or step == 1):
            stats = opt.last_stats
            parts = [
                f"{name}: loss {losses[name].item():8.4f} |g| {norm:8.4f} w {weight:7.3f} w|g| {weight * norm:7.4f}"
                for name, norm, weight in zip(stats.names, stats.norms.tolist(), stats.weights.tolist(), strict=True)
            ]
            print(f"step {step:3d}  " + "  ".join(parts), flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
