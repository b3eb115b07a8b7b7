"""Reproducible randomness for the plugins that draw at random (``pcgrad``, ``gradvac``, ``rlw``).

Every draw is a pure function of the plugin's ``seed`` option, the step number and the group
*names*, never of the device RNG or of the order the groups arrived in. So every rank draws the
same numbers without communicating, a resumed run draws what the uninterrupted one would have,
and permuting the groups permutes the draws with them (the plugins stay permutation equivariant).
Nothing here touches a device tensor: the draws are made on the host and moved to the device once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["group_normals", "random_orders", "stable_seed"]

_MASK64 = (1 << 64) - 1


def stable_seed(*parts: object) -> int:
    """A 63-bit integer that depends only on ``parts`` (Python's ``hash`` of a str is salted per process)."""
    text = "\x1f".join(repr(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _mix(a: int, b: int) -> int:
    """splitmix64 finaliser of ``a`` and ``b``: a well-spread key for the ordered pair."""
    z = (a * 0x9E3779B97F4A7C15 + b) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def random_orders(names: Sequence[str], seed: int, step: int, tag: str, device: torch.device) -> Tensor:
    """``[k, k-1]`` long tensor: row ``i`` lists the other groups in a random order.

    Each group ``i`` gets its own order, as in PCGrad's Algorithm 1 (every gradient visits the
    others in a freshly shuffled order). The order of row ``i`` sorts the other groups by a key
    drawn for the pair of names ``(names[i], names[j])``, so it is uniform over permutations and
    does not depend on where the groups sit in ``names``.
    """
    base = [stable_seed(tag, seed, step, name) for name in names]
    k = len(names)

    def order(i: int) -> list[int]:
        return sorted((j for j in range(k) if j != i), key=lambda j: _mix(base[i], base[j]))

    rows = [order(i) for i in range(k)]
    return torch.tensor(rows, dtype=torch.long, device=device).reshape(k, max(k - 1, 0))


def group_normals(names: Sequence[str], seed: int, step: int, tag: str, device: torch.device) -> Tensor:
    """``[k]`` float64 standard normal draws, one per group name, from CPU ``torch.Generator`` s."""
    draws = []
    for name in names:
        generator = torch.Generator().manual_seed(stable_seed(tag, seed, step, name))
        draws.append(torch.randn(1, generator=generator, dtype=torch.float64))
    if not draws:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.cat(draws).to(device)
