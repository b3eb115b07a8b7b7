"""The ``"balancer"`` section of a state dict: plugin names, versions and states."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import StateDictError
from .plugin import Plugin, State

FORMAT_VERSION = 1


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_device(v, device) for v in value)
    return value


def make_balancer_section(
    plugins: Sequence[Plugin], states: dict[str, State], step: int, rows: int = 0
) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "step": step,
        "rows": rows,  # the most groups captured in one step (optional on load)
        "plugins": [{"name": p.name, "version": p.version} for p in plugins],
        "states": {p.name: states[p.name] for p in plugins},
    }


def load_balancer_section(
    section: Any, plugins: Sequence[Plugin], device: torch.device
) -> tuple[dict[str, State], int]:
    """Validates a saved section against the current plugin list and returns (states, step)."""
    if section is None:
        if plugins:
            raise StateDictError(
                "The state dict has no 'balancer' section (was it saved from the bare optimizer?). "
                f"This Balancer has plugins {[p.name for p in plugins]} whose state it cannot restore. "
                "Load it into `balancer.inner` instead if that is intended."
            )
        return {}, 0
    if not isinstance(section, dict) or section.get("format") != FORMAT_VERSION:
        found = section.get("format") if isinstance(section, dict) else section
        raise StateDictError(
            f"Unsupported 'balancer' state dict section (format {found!r}); this version reads format {FORMAT_VERSION}."
        )
    saved = {entry["name"]: entry["version"] for entry in section["plugins"]}
    current = {p.name: p.version for p in plugins}
    missing = sorted(set(current) - set(saved))
    extra = sorted(set(saved) - set(current))
    if missing or extra:
        raise StateDictError(
            "The state dict was saved with a different plugin list. "
            f"Missing from the checkpoint (configured here): {missing or 'none'}; "
            f"extra in the checkpoint (not configured here): {extra or 'none'}. "
            "Configure the same plugins as when it was saved."
        )
    changed = sorted(name for name in current if saved[name] != current[name])
    if changed:
        detail = ", ".join(f"{n}: saved {saved[n]}, installed {current[n]}" for n in changed)
        raise StateDictError(f"Plugin state versions differ ({detail}); the saved state cannot be read.")
    states = {name: _to_device(section["states"][name], device) for name in current}
    return states, int(section["step"])
