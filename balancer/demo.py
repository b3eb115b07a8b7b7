"""The smallest real example: two regression tasks on a shared trunk, one with 10x larger
gradients, trained with and without balancing. Prints per-task gradient norms, weights and
final per-task losses."""

from __future__ import annotations

import torch

from .config import build_plugins
from .optimizer import Balancer


def _tasks(seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=gen)
    w_small = torch.randn(16, generator=gen)
    w_large = torch.randn(16, generator=gen)
    targets = {
        "small": torch.sin(x @ w_small / 4),  # a smooth task with small targets
        "large": 10.0 * torch.tanh(x @ w_large / 4),  # 10x larger targets, 10x larger gradients
    }
    return x, targets


def _train(plugins: list[str], steps: int, seed: int, log_every: int) -> dict[str, float]:
    torch.manual_seed(seed)
    x, targets = _tasks(seed)
    trunk = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh())
    heads = torch.nn.ModuleDict({name: torch.nn.Linear(64, 1) for name in targets})
    params = [*trunk.parameters(), *heads.parameters()]
    opt = Balancer(torch.optim.Adam(params, lr=3e-3), plugins=plugins)
    label = "+".join(plugins) if plugins else "no balancing"
    print(f"\n== {label} ==")
    print(f"{'step':>5}  " + "  ".join(f"{'|g_' + n + '|':>12} {'w_' + n:>8}" for n in targets))
    for step in range(steps):
        features = trunk(x)
        losses = {n: torch.nn.functional.mse_loss(heads[n](features).squeeze(-1), t) for n, t in targets.items()}
        opt.backward(losses)
        opt.step()
        opt.zero_grad()
        if step % log_every == 0 or step == steps - 1:
            stats = opt.last_stats
            assert stats is not None and stats.weights is not None
            cells = [
                f"{stats.norms[i].item():12.4f} {stats.weights[i].item():8.3f}" for i in range(len(stats.names))
            ]
            print(f"{step:5d}  " + "  ".join(cells))
    with torch.no_grad():
        features = trunk(x)
        final = {n: torch.nn.functional.mse_loss(heads[n](features).squeeze(-1), t).item() for n, t in targets.items()}
    # Relative loss: final loss over the variance of the targets (1.0 = predicting the mean).
    return {n: final[n] / targets[n].var().item() for n in targets}


def run_demo(*, steps: int = 200, seed: int = 0, plugins: str = "task_norm") -> int:
    chosen = [p.strip() for p in plugins.split(",") if p.strip()]
    build_plugins(chosen)  # refuse unknown names or bad options before any training
    print("Two tasks share a trunk; task 'large' has 10x larger targets and gradients.")
    results = {"baseline": _train([], steps, seed, max(1, steps // 5))}
    results["balanced"] = _train(chosen, steps, seed, max(1, steps // 5))
    print("\nFinal loss / target variance (lower is better):")
    for run, rel in results.items():
        print(f"  {run:>9}: " + "  ".join(f"{n}={v:.4f}" for n, v in rel.items()))
    return 0
