"""The plugin protocol: options model, explicit state, ``init`` and ``update``.

A plugin turns :class:`~balancer.contract.stats.GroupStats` and the weights produced so far into new
weights. It never keeps mutable state in attributes: ``init()`` returns the initial state and
``update()`` returns the new one, which the :class:`~balancer.Balancer` stores, checkpoints and
hands back next step. State holds tensors and Python scalars only (nested in dicts, lists or
tuples), so it survives ``torch.load(weights_only=True)``.

Example, a plugin that halves the weight of one group::

    class Halve(Plugin):
        '''Halves the weight of the group named in the options.'''

        name = "halve"

        class Options(PluginOptions):
            group: str

        def update(self, stats, weights, state):
            mask = torch.tensor([n == self.options.group for n in stats.names], device=weights.device)
            return torch.where(mask, weights / 2, weights), state
"""

from __future__ import annotations

import abc
import inspect
import reprlib
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeAlias

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from balancer.contract.stats import GroupStats
from balancer.contract.tap_event import TapEvent

__all__ = ["InvalidStateError", "Plugin", "PluginOptions", "State", "check_state_like", "check_state_types"]

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


class PluginOptions(BaseModel):
    """Base of every plugin's options model: frozen, and unknown keys are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Plugin(abc.ABC):
    """Base class of all plugins.

    Subclasses set ``name`` (the registry name, also the key of the plugin's state in
    ``state_dict``), optionally ``version`` (bump it when the state layout changes) and
    ``Options`` (a :class:`PluginOptions` subclass), and implement :meth:`update`, the tap
    methods (:meth:`tap`, with :meth:`init_tap_stats` and :meth:`merge_tap_stats`), or both.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not inspect.isabstract(cls) and "name" in cls.__dict__:
            if cls.update is Plugin.update and cls.tap is Plugin.tap:
                raise TypeError(f"Plugin `{cls.name}` must implement update(), tap(), or both.")

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    Options: ClassVar[type[PluginOptions]] = PluginOptions
    needs_losses: ClassVar[bool] = False
    """True for a plugin that reads ``stats.losses``. A group captured with ``with opt.group(name):
    loss.backward()`` has no recorded loss (NaN) and such a plugin falls back (equal weights, no
    loss normalisation): the Balancer warns once when it runs on a step where a group's loss was
    not recorded. A plugin whose need depends on its options overrides it with a property."""
    nonfinite_state: ClassVar[Nonfinite] = {}
    """Paths in the state (``"log_loss"``, ``"task_norm.ema_target"``) whose floating values may be
    NaN (``"nan"``: an "unknown" marker the plugin handles) or also ±inf (``"any"``: values that are
    only logged). Every other floating value of a state must be finite (see :meth:`check_state`)."""

    def __init__(self, options: PluginOptions | Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        if isinstance(options, PluginOptions):
            if kwargs:
                raise TypeError(f"Plugin `{self.name}`: pass either an options object or keywords, not both.")
            if not isinstance(options, self.Options):
                raise TypeError(
                    f"Plugin `{self.name}` expects options of type `{self.Options.__name__}`. "
                    f"Found `{type(options).__name__}`."
                )
            self.options = options
        else:
            merged = {**dict(options or {}), **kwargs}
            self.options = self.Options.model_validate(merged)

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        doc = inspect.getdoc(cls) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    def init(self) -> State:
        """Returns the initial state. Stateless plugins keep the default empty dict."""
        return {}

    def check_state(self, state: State) -> None:
        """Raises :class:`InvalidStateError` (a ``ValueError``) if ``state`` is not one this plugin
        could have produced; the Balancer calls it on every state it restores from a checkpoint.

        The default checks the structure of :meth:`init` (see :func:`check_state_like`) and that
        floating values are finite except at the paths of :attr:`nonfinite_state`. Override it,
        calling ``super().check_state(state)`` first, to check what the structure cannot say (one
        entry per stored group name, a count that cannot be negative): a state that passes must
        not make :meth:`update` raise or silently drop a group.
        """
        check_state_like(state, self.init(), self.nonfinite_state)

    def update(self, stats: GroupStats, weights: Tensor, state: State) -> tuple[Tensor, State]:
        """Returns ``(new_weights, new_state)``.

        Args:
            stats: this step's statistics; ``stats.gram`` is float64 on the weights' device.
            weights: ``[k]`` float64 weights produced by the plugins before this one (ones for
                the first plugin). A plugin usually multiplies them by its own factors.
            state: the state returned by the previous call (or by :meth:`init`).

        Must not synchronise with the device (no ``.item()``, no Python ``if`` on tensor values)
        and must not modify ``state`` in place. The default passes the weights through
        (for plugins that only act at taps).
        """
        return weights, state

    @property
    def acts_on_groups(self) -> bool:
        """Whether :meth:`update` weighs the groups with these options (a step that captured no
        group then balanced nothing, and the Balancer warns). Default: ``update`` is implemented."""
        return type(self).update is not Plugin.update

    # -- taps (optional) ---------------------------------------------------------------------
    @property
    def uses_taps(self) -> bool:
        """Whether this plugin implements :meth:`tap` (only such plugins see tapped gradients)."""
        return type(self).tap is not Plugin.tap

    @property
    def needs_taps(self) -> bool:
        """Whether this plugin does nothing without ``opt.tap`` (the Balancer warns when a step saw no
        tapped gradient). Default: :attr:`uses_taps`; a plugin that only logs at taps says False."""
        return self.uses_taps

    def init_tap_stats(self) -> State:
        """The empty per-step accumulator of tap statistics.

        Every key the accumulator will ever hold must be here, with a tensor of its final
        dtype: at step time each tensor is summed over data-parallel ranks (zero-padded along
        dimension 0 to the longest rank's length, so per-class sums may grow), then handed to
        :meth:`merge_tap_stats`. A rank that saw no tap in a step contributes this value.
        """
        return {}

    def tap(self, event: TapEvent, state: State, tap_stats: State) -> tuple[Tensor, State]:
        """Sees the gradient arriving at an ``opt.tap(...)`` tensor; returns ``(grad, tap_stats)``.

        Runs inside the backward pass, once per tapped tensor and backward pass, in the
        plugins' order (each sees the gradient the previous one returned). ``state`` is this
        plugin's state as of the last step (read only); ``tap_stats`` is this step's
        accumulator, to be returned updated (not modified in place). Same rules as
        :meth:`update`: no host syncs.
        """
        return event.grad, tap_stats

    def merge_tap_stats(self, state: State, tap_stats: State) -> State:
        """Folds one step's accumulator, already summed over ranks, into the state (at step time)."""
        return state

    def metrics(self, state: State) -> dict[str, Any]:
        """Numbers worth logging from the state after a step (tensors or floats); default none."""
        return {}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.options.model_dump().items())
        return f"{type(self).__name__}({fields})"
