"""The plugin protocol: options model, explicit state, ``init`` and ``update``.

A plugin turns :class:`~balancer.stats.GroupStats` and the weights produced so far into new
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
from collections.abc import Mapping
from typing import Any, ClassVar, TypeAlias

from pydantic import BaseModel, ConfigDict
from torch import Tensor

from .stats import GroupStats
from .taps import TapEvent

__all__ = ["Plugin", "PluginOptions", "State"]

State: TypeAlias = dict[str, Any]
"""A plugin's state: a dict of tensors, Python scalars, and dicts/lists/tuples of them."""


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

    # -- taps (optional) ---------------------------------------------------------------------
    @property
    def uses_taps(self) -> bool:
        """Whether this plugin implements :meth:`tap` (only such plugins see tapped gradients)."""
        return type(self).tap is not Plugin.tap

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
