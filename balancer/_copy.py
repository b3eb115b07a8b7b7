"""Copies of plugin states, so that a plugin that writes into its input cannot change them."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def copy_state(value: Any) -> Any:
    """A copy of a plugin state (tensors cloned, containers rebuilt). States are small (a few
    numbers per group), so a refused step can always leave the states it was given untouched."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: copy_state(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(copy_state(v) for v in value)
    return value
