"""The ``"balancer"`` section of a state dict: plugin names, versions and states, checked both ways.

On save every plugin state must hold only what ``torch.load(weights_only=True)`` reads back. On
load the section is validated before anything is restored: its structure (``format``, ``step``,
``rows``, ``plugins``, ``states``), the plugin list against the configured one, and each plugin's
state with :meth:`Plugin.check_state <balancer.contract.plugin.Plugin.check_state>` (the structure of its
``init()``, finite values except declared "unknown" markers). Every problem is a
:class:`~balancer.errors.StateDictError` naming the field (``balancer.states.task_norm.ema_norms.math``),
the value found and the fix.
"""

from __future__ import annotations

import reprlib
from collections import Counter
from collections.abc import Sequence
from typing import Any, TypeGuard

import torch

from balancer._copy import map_tensors
from balancer.contract.plugin import InvalidStateError, Plugin, State, check_state_types
from balancer.errors import StateDictError

FORMAT_VERSION = 1

MAX_ROWS = 4096
"""The largest ``rows`` a checkpoint may carry. ``rows`` is the most groups one step captured, and the
next capture reserves that many gradient rows, each a full copy of the trained gradients. The
project measures up to k = 256 groups (``benchmarks/many_groups.py``); at k = 4096 every step
would also build and all-reduce a 4096×4096 Gram matrix and the aggregators would factorise it
(about 7e10 flops per solve), so no run has more, while a corrupt value (2e9 rows of the 163
parameters of a small MLP: 1.6 TB) would be allocated as is. ``rows`` is only a hint (summation
order of the first steps after a resume): a checkpoint above the bound loads once it is deleted."""

_REFUSE = "The checkpoint is damaged or was edited: load an earlier one, or re-save it from a healthy run."


def _field(prefix: str, path: str) -> str:
    return prefix if not path else f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}"


def _short(value: Any) -> str:
    return f"`{reprlib.repr(value)}` ({type(value).__name__})"


def make_balancer_section(
    plugins: Sequence[Plugin], states: dict[str, State], step: int, rows: int = 0
) -> dict[str, Any]:
    """The section to save; refuses a plugin state that ``torch.load(weights_only=True)`` could not read."""
    for p in plugins:
        try:
            check_state_types(states[p.name])
        except InvalidStateError as exc:
            raise StateDictError(
                f"Cannot save the state of plugin `{p.name}`: {_field(f'balancer.states.{p.name}', exc.path)}: "
                f"{exc.problem}. This is a bug in the plugin: its init()/update() must return such values "
                "(run balancer.contract.testing.check_plugin on it)."
            ) from None
    return {
        "format": FORMAT_VERSION,
        "step": step,
        "rows": rows,  # the most groups captured in one step (optional on load)
        "plugins": [{"name": p.name, "version": p.version} for p in plugins],
        "states": {p.name: states[p.name] for p in plugins},
    }


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _all_str(values: Any) -> bool:
    return all(isinstance(v, str) for v in values)


def _found(section: dict[Any, Any], key: str) -> str:
    return f"balancer.{key} is " + (_short(section[key]) if key in section else "missing")


def _structure_problems(section: dict[Any, Any]) -> list[str]:
    """Problems with the keys, ``step``, ``rows``, ``plugins`` and ``states`` (``format`` is already right)."""
    problems = []
    unexpected = sorted(map(str, section.keys() - {"format", "step", "rows", "plugins", "states"}))
    if unexpected:
        problems.append(
            f"balancer has unexpected keys {unexpected}; a format-1 section holds only format, "
            "step, rows, plugins and states"
        )
    step = section.get("step")
    if not _is_int(step) or not 0 <= step < 2**63:
        problems.append(f"{_found(section, 'step')}; it must be the number of steps taken, an int >= 0")
    rows = section.get("rows", 0)
    if not _is_int(rows) or not 0 <= rows <= MAX_ROWS:
        problems.append(
            f"{_found(section, 'rows')}; it must be the most groups captured in one step, an int from 0 to "
            f"{MAX_ROWS} (see balancer._checkpoint_section.MAX_ROWS). It is an optional hint: delete the entry to "
            "load the "
            "rest (the first steps after the resume then sum in another order, equal to rounding)"
        )
    entries = section.get("plugins")
    if not isinstance(entries, list):
        problems.append(f"{_found(section, 'plugins')}; it must be a list of {{'name': str, 'version': str}} dicts")
    else:
        valid = [isinstance(e, dict) and e.keys() == {"name", "version"} and _all_str(e.values()) for e in entries]
        problems += [
            f"balancer.plugins[{i}] is {_short(e)}; it must be a dict with a str 'name' and a str 'version'"
            for i, (e, ok) in enumerate(zip(entries, valid, strict=True))
            if not ok
        ]
        names = [e["name"] for e, ok in zip(entries, valid, strict=True) if ok]
        repeated = sorted(n for n, count in Counter(names).items() if count > 1)
        if repeated:
            problems.append(f"balancer.plugins lists {repeated} more than once; each plugin appears once")
    if not isinstance(section.get("states"), dict):
        problems.append(f"{_found(section, 'states')}; it must be a dict of plugin states keyed by plugin name")
    return problems


def _check_plugin_list(section: dict[Any, Any], plugins: Sequence[Plugin]) -> None:
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
        raise StateDictError(
            f"Plugin state versions differ ({detail}); the saved state cannot be read. "
            "Install the plugin version the checkpoint was saved with."
        )
    states = section["states"]
    absent = [name for name in current if name not in states]
    unknown = [name for name in states if name not in current]
    if absent or unknown:
        raise StateDictError(
            f"balancer.states lacks the state of {absent or 'no plugin'} and holds states of "
            f"{unknown or 'no other plugin'} although balancer.plugins lists {list(current)}. {_REFUSE}"
        )


def _check_state(plugin: Plugin, state: Any) -> None:
    prefix = f"balancer.states.{plugin.name}"
    try:
        check_state_types(state)
        plugin.check_state(state)
    except InvalidStateError as exc:
        raise StateDictError(f"{_field(prefix, exc.path)}: {exc.problem}. {_REFUSE}") from None
    except (ValueError, TypeError) as exc:
        raise StateDictError(f"{prefix} is refused by plugin `{plugin.name}`: {exc}. {_REFUSE}") from None


def load_balancer_section(
    section: Any, plugins: Sequence[Plugin], device: torch.device
) -> tuple[dict[str, State], int]:
    """Validates a saved section against the current plugin list and returns (states, step).

    Nothing is restored unless the whole section is valid; ``section["rows"]`` (read by the caller)
    is validated here too.
    """
    if section is None:
        if plugins:
            raise StateDictError(
                "The state dict has no 'balancer' section (was it saved from the bare optimizer?). "
                f"This Balancer has plugins {[p.name for p in plugins]} whose state it cannot restore. "
                "Load it into `balancer.inner` instead if that is intended."
            )
        return {}, 0
    found = section.get("format", "missing") if isinstance(section, dict) else section
    if not isinstance(section, dict) or not _is_int(found) or found != FORMAT_VERSION:
        raise StateDictError(
            f"Unsupported 'balancer' state dict section (balancer.format is {_short(found)}); this version "
            f"reads format {FORMAT_VERSION}, a dict saved by Balancer.state_dict(). {_REFUSE}"
        )
    problems = _structure_problems(section)
    if problems:
        raise StateDictError("Invalid 'balancer' section:\n" + "\n".join(f"  - {p}" for p in problems) + f"\n{_REFUSE}")
    _check_plugin_list(section, plugins)
    for plugin in plugins:
        _check_state(plugin, section["states"][plugin.name])
    states = {p.name: map_tensors(section["states"][p.name], lambda t: t.to(device)) for p in plugins}
    return states, section["step"]
