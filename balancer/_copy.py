"""Plugin states as trees: dicts, lists and tuples whose leaves are tensors or Python scalars."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor


def map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``value`` with every tensor leaf replaced by ``fn(leaf)`` (containers rebuilt, scalars kept)."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def copy_state(value: Any) -> Any:
    """A copy of a plugin state (tensors cloned, containers rebuilt). States are small (a few
    numbers per group), so a refused step can always leave the states it was given untouched."""
    return map_tensors(value, Tensor.clone)
