"""Models, data and per-group references shared by the layer capture tests (``test_layer_capture_*``)."""

from __future__ import annotations

import torch
from torch import nn

TOL = dict(rtol=1e-10, atol=1e-10)


def _model(bias: bool, widths=(6, 9, 5, 3), seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=False)):
        layers += [nn.Linear(a, b, bias=bias or i == 1), nn.Tanh() if i % 2 else nn.ReLU()]
    return nn.Sequential(*layers[:-1]).double()


def _data(batch: int, seq: int | None, d_in: int = 6, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, d_in) if seq is None else (batch, seq, d_in)
    return torch.randn(*shape, generator=gen, dtype=torch.float64), torch.randn(
        batch, generator=gen, dtype=torch.float64
    )


def _losses(model: nn.Module, x, y):
    out = model(x)
    return (out.reshape(x.shape[0], -1).sum(1) - y) ** 2


def _groups(batch: int, k: int) -> list[str]:
    sizes = [1 + i for i in range(k)]  # unequal sizes
    names = [f"g{i}" for i in range(k) for _ in range(sizes[i])]
    return (names * batch)[:batch] if len(names) < batch else names[:batch]


def _reference(model, x, y, groups):
    """Per-group gradient rows [k, n] from separate autograd.grad calls, in first-appearance order."""
    params = list(model.parameters())
    names = list(dict.fromkeys(groups))
    losses = _losses(model, x, y)
    rows = []
    for name in names:
        mask = torch.tensor([g == name for g in groups])
        grads = torch.autograd.grad(losses[mask].sum(), params, retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return names, torch.stack(rows)


def _sgd_update(model, run):
    """Runs one step with SGD(lr=1); returns the flat update (= the gradient handed to SGD)."""
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    run()
    return before - torch.cat([p.detach().flatten() for p in model.parameters()])


class _WithNorm(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = norm

    def forward(self, x):
        return self.norm(self.fc(x))


def _hook_count(model: nn.Module) -> int:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, n)) for m in model.modules() for n in names)


class _Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 7), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(7, 2) for _ in range(3))


def _task_losses(model: _Heads, x, seq):
    """Three scalar task losses on one trunk forward (each head reaches only its own task)."""
    features = model.trunk(x)
    gen = torch.Generator().manual_seed(7)
    targets = [torch.randn(x.shape[0], generator=gen, dtype=torch.float64) for _ in model.heads]
    outs = [head(features).reshape(x.shape[0], -1).sum(1) for head in model.heads]
    return {f"t{t}": ((out - y) ** 2).mean() for t, (out, y) in enumerate(zip(outs, targets, strict=True))}
