"""What a plugin state may hold, checked: tensors and Python scalars in dicts, lists and tuples
(what ``torch.load(weights_only=True)`` reads back), with the structure of the plugin's ``init()``.

:meth:`~balancer.contract.plugin.Plugin.check_state` runs these on every state the Balancer
restores from a checkpoint.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from typing import Any, Literal, TypeAlias

import torch
from torch import Tensor

__all__ = ["InvalidStateError", "Nonfinite", "State", "check_state_like", "check_state_types"]

State: TypeAlias = dict[str, Any]
"""A plugin's state: a dict of tensors, Python scalars, and dicts/lists/tuples of them."""

Nonfinite: TypeAlias = Mapping[str, Literal["nan", "any"]]
"""State paths whose floating values may be NaN (``"nan"``) or NaN and ±inf (``"any"``)."""

_SCALARS = (bool, int, float, str, type(None))


class InvalidStateError(ValueError):
    """A plugin state that cannot be one the plugin produced; ``path`` locates the value in the state
    (``"ema_norms.math"``, ``"logits[2]"``; empty for the state itself)."""

    def __init__(self, path: str, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(f"{path or '<state>'}: {problem}")


def _join(path: str, key: Any) -> str:
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{path}[{key}]"
    text = key if isinstance(key, str) and key.isidentifier() else repr(key)
    return f"{path}.{text}" if path else text


def _describe(value: Any, template: bool = False) -> str:
    if isinstance(value, Tensor):
        shape = ", ".join("*" if template and n == 0 else str(n) for n in value.shape)
        shape = f"({shape},)" if value.dim() == 1 else f"({shape})"
        return f"a {value.dtype} tensor of shape {shape}" + (" (* grows with the groups)" if "*" in shape else "")
    return f"`{reprlib.repr(value)}` ({type(value).__name__})"


def check_state_types(value: Any, path: str = "") -> None:
    """Raises :class:`InvalidStateError` unless ``value`` holds only tensors, Python scalars
    (bool, int, float, str, None) and dicts/lists/tuples of them, with scalar dict keys: what
    ``torch.load(weights_only=True)`` reads back."""
    if isinstance(value, Tensor):
        if type(value) not in (Tensor, torch.nn.Parameter) or value.layout != torch.strided:
            raise InvalidStateError(path, f"found a {type(value).__name__} ({value.layout}); keep plain dense tensors")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, _SCALARS):
                raise InvalidStateError(path, f"found the dict key {_describe(key)}; keys must be str, int or float")
            check_state_types(item, _join(path, key))
    elif isinstance(value, list | tuple):
        if type(value) not in (list, tuple):
            raise InvalidStateError(path, f"found a {type(value).__name__}; use a plain list, tuple or dict")
        for i, item in enumerate(value):
            check_state_types(item, _join(path, i))
    elif type(value) not in _SCALARS:
        raise InvalidStateError(
            path,
            f"found {_describe(value)}, which torch.load(weights_only=True) cannot read back; "
            "store tensors, Python scalars (bool/int/float/str/None) and dicts/lists/tuples of them",
        )


def _allowed(path: str, nonfinite: Nonfinite) -> str | None:
    for prefix, kind in nonfinite.items():
        if path == prefix or path.startswith((prefix + ".", prefix + "[")):
            return kind
    return None


def _check_finite(value: Any, path: str, nonfinite: Nonfinite) -> None:
    """Floating values are finite, except NaN (or any value) where ``nonfinite`` says so."""
    kind = _allowed(path, nonfinite)
    if kind == "any":
        return
    if isinstance(value, Tensor):
        if value.is_floating_point() or value.is_complex():
            bad = ~torch.isfinite(value) if kind is None else torch.isinf(value)
            if bool(bad.any()):
                index = [int(i) for i in bad.nonzero()[0]]
                where = f"{path}[{', '.join(map(str, index))}]" if index else path
                found = value[tuple(index)].item()
                expected = "finite" if kind is None else "finite or NaN (unknown)"
                raise InvalidStateError(where, f"found {found}; this value must be {expected}")
    elif isinstance(value, float) and (abs(value) == float("inf") or (kind is None and value != value)):
        expected = "finite" if kind is None else "finite or NaN (unknown)"
        raise InvalidStateError(path, f"found {value}; this value must be {expected}")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, _join(path, key), nonfinite)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_finite(item, _join(path, i), nonfinite)


def check_state_like(state: Any, template: Any, nonfinite: Nonfinite | None = None, path: str = "") -> None:
    """Raises :class:`InvalidStateError` unless ``state`` has the structure of ``template`` (``init()``).

    Dicts have the template's keys and lists/tuples its length, except where the template's
    container is empty (filled per group as the plugin runs: anything of the allowed types);
    tensors have its dtype and number of dimensions, and its size along every dimension that is
    not 0 in the template (a 0 dimension grows with the groups); scalars have its type (an int
    is accepted for a float; None accepts anything). Floating values are finite, except at the
    paths ``nonfinite`` lists.
    """
    nonfinite = nonfinite or {}
    check_state_types(state, path)
    _check_like(state, template, path)
    _check_finite(state, path, nonfinite)


def _check_like(state: Any, template: Any, path: str) -> None:
    if template is None:
        return
    if isinstance(template, Tensor):
        fixed = [(i, n) for i, n in enumerate(template.shape) if n != 0]
        if (
            not isinstance(state, Tensor)
            or (state.dtype, state.dim()) != (template.dtype, template.dim())
            or any(state.shape[i] != n for i, n in fixed)
        ):
            raise InvalidStateError(path, f"found {_describe(state)}; expected {_describe(template, template=True)}")
        return
    if isinstance(template, dict | list | tuple):
        if type(state) is not type(template):
            raise InvalidStateError(path, f"found {_describe(state)}; expected a {type(template).__name__}")
        if isinstance(template, dict) and template:
            missing, extra = [k for k in template if k not in state], [k for k in state if k not in template]
            if missing or extra:
                raise InvalidStateError(
                    path, f"missing keys {missing}, unexpected keys {extra}; expected {list(template)}"
                )
            for key, item in template.items():
                _check_like(state[key], item, _join(path, key))
        elif isinstance(template, list | tuple) and template:
            if len(state) != len(template):
                raise InvalidStateError(path, f"found {len(state)} entries; expected {len(template)}")
            for i, item in enumerate(template):
                _check_like(state[i], item, _join(path, i))
        return
    expected = (int, float) if type(template) is float else (type(template),)
    if type(state) not in expected:
        raise InvalidStateError(path, f"found {_describe(state)}; expected a {type(template).__name__}")
