"""The single-process reference of the DeepSpeed tests: a shared trunk with one head per group,
trained by a plain torch Balancer on the global batch (8 rows per group and step) that the two
ranks of a test launch split between them."""

from __future__ import annotations

import functools

import torch

from balancer import Balancer

STEPS = 3
GROUPS = {"small": 0.1, "mid": 1.0, "large": 30.0}  # gradient scales differ by 300x
PLUGINS = ["task_norm"]


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh())
        self.heads = torch.nn.ModuleDict({n: torch.nn.Linear(16, 3) for n in GROUPS})

    def forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.heads[name](self.trunk(x))


def global_batch(step: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + sorted(GROUPS).index(name))
    return torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen) * GROUPS[name]


@functools.cache
def reference(ungrouped: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Parameters after ``STEPS`` steps and the last weights (``ungrouped``: plus an ungrouped term)."""
    torch.manual_seed(0)
    model = Net()
    opt = Balancer(torch.optim.AdamW(model.parameters(), lr=1e-2), plugins=PLUGINS)
    loss = torch.nn.functional.mse_loss
    for step in range(STEPS):
        if ungrouped:
            x, y = global_batch(step + 50, "mid")
            (0.3 * loss(model(x, "mid"), y)).backward()
        for name in GROUPS:
            x, y = global_batch(step, name)
            with opt.group(name):
                loss(model(x, name), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], opt.last_stats.weights


def relative_error(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, expected, strict=True))
