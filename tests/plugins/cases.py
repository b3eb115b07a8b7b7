"""Adversarial gradient sets shared by the plugin tests: explicit ``[k, n]`` float64 rows.

``gradient_cases(seed)`` draws, from one generator and always in the same order, two base vectors
``g, h`` (7 coordinates), a random matrix and a rank-2 matrix, and builds the degenerate sets from
them. A test file picks the cases it checks by name, so the numbers it saw before stay the same.
``stats_of(a, device)`` turns rows into the :class:`GroupStats` a plugin receives.
"""

from __future__ import annotations

import torch

from balancer import GroupStats

F64 = torch.float64

#: Every case ``gradient_cases`` builds, in order, and what makes it hard.
CASES = {
    "random": "random rows (the shape asked for)",
    "rank-deficient": "5 rows spanning 2 dimensions",
    "collinear": "g, 3g, 0.1g: one direction, three lengths",
    "opposite": "g, -g, h: 0 in the convex hull",
    "zero row": "one group without gradient",
    "k=1": "a single group",
    "badly scaled": "norms spread over many orders of magnitude",
    "duplicated": "the same group twice (a singular Gram matrix)",
    "huge": "norms around 1e30 (squares near the float64 limit)",
    "tiny": "norms around 1e-30 (squares below 1e-60)",
}


def gradient_cases(
    seed: int,
    *,
    random_shape: tuple[int, int] = (5, 7),
    badly_scaled: tuple[float, float] = (1e-6, 1e5),
    names: tuple[str, ...] | None = None,
) -> dict[str, torch.Tensor]:
    """The cases of :data:`CASES` (or those in ``names``), drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    g, h = torch.randn(2, 7, generator=gen, dtype=F64)
    random = torch.randn(*random_shape, generator=gen, dtype=F64)
    rank2 = torch.randn(5, 2, generator=gen, dtype=F64) @ torch.randn(2, 7, generator=gen, dtype=F64)
    small, large = badly_scaled
    three = torch.stack([g, h, g - h])
    cases = {
        "random": random,
        "rank-deficient": rank2,
        "collinear": torch.stack([g, 3 * g, 0.1 * g]),
        "opposite": torch.stack([g, -g, h]),
        "zero row": torch.stack([g, torch.zeros_like(g), h]),
        "k=1": g[None],
        "badly scaled": torch.stack([g * small, h, (g - h) * large]),
        "duplicated": torch.stack([g, g, h]),
        "huge": three * 1e30,
        "tiny": three * 1e-30,
    }
    return cases if names is None else {name: cases[name] for name in names}


def case_params(cases: dict[str, torch.Tensor]) -> list:
    """``pytest.param(name, a, id=name)`` for ``@pytest.mark.parametrize(("name", "a"), ...)``."""
    import pytest

    return [pytest.param(name, a, id=name) for name, a in cases.items()]


def stats_of(
    a: torch.Tensor, device: torch.device | str = "cpu", losses: torch.Tensor | None = None, step: int = 0
) -> GroupStats:
    """The stats of the gradient rows ``a`` on ``device``: Gram ``a aᵀ`` (computed in float64 on the
    CPU, so every device sees the same numbers), names ``group0…``, losses when given."""
    gram = (a @ a.T).to(device)
    names = [f"group{i}" for i in range(a.shape[0])]
    return GroupStats.from_gram(gram, names, losses=None if losses is None else losses.to(device), step=step)


def dpo_pair_events(device: torch.device | str = "cpu") -> list:
    """Tap events of four chosen/rejected log-prob pairs (some probabilities 0) on ``device``."""
    from balancer.contract.testing import tap_event

    lw = torch.tensor([-1.0, -5.0, -2.0, float("-inf")], dtype=F64)
    ll = torch.tensor([-3.0, -1.0, float("-inf"), float("-inf")], dtype=F64)
    pair = torch.arange(4)
    groups = ["chosen"] * 4 + ["rejected"] * 4
    events = []
    for s in range(2):
        grad = torch.randn(8, generator=torch.Generator().manual_seed(s), dtype=F64)
        value, labels = torch.cat([lw, ll]), torch.cat([pair, pair])
        events.append(tap_event(value.to(device), groups, labels.to(device), grad.to(device)))
    return events


def replay_events(device: torch.device | str = "cpu") -> list:
    """Tap events of cross-entropy logits gradients, current and replay rows mixed, on ``device``."""
    from balancer.contract.testing import tap_event

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=gen, dtype=F64)
    labels = torch.tensor([0, 1, 1, 3, 4, 0])
    groups = ["current", "replay", "current", "replay", "replay", "current"]
    grad = logits.softmax(1) - torch.nn.functional.one_hot(labels, 5)
    logits, labels, grad = logits.to(device), labels.to(device), grad.to(device)
    return [tap_event(logits, groups, labels, grad), tap_event(logits[:3] * 2, groups[:3], labels[:3], grad[:3])]
