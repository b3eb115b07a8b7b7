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
from collections.abc import Mapping
from typing import Any, ClassVar, Generic, TypeVar, cast

from pydantic import BaseModel, ConfigDict
from torch import Tensor

from balancer.contract.state_checks import (
    InvalidStateError,
    Nonfinite,
    State,
    check_state_like,
    check_state_types,
)
from balancer.contract.stats import GroupStats
from balancer.contract.tap_event import TapEvent

__all__ = [
    "InvalidStateError",
    "Plugin",
    "PluginOptions",
    "State",
    "StateT",
    "TapPlugin",
    "TapStatsT",
    "check_state_like",
    "check_state_types",
]


StateT = TypeVar("StateT", bound=Mapping[str, Any])
"""A plugin's state type: a ``TypedDict`` for the built-ins (``Plugin[TaskNormState]``), ``State`` by default."""
TapStatsT = TypeVar("TapStatsT", bound=Mapping[str, Any])
"""A tap plugin's per-step accumulator type."""


class PluginOptions(BaseModel):
    """Base of every plugin's options model: frozen, and unknown keys are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Plugin(abc.ABC, Generic[StateT]):
    """Base class of all plugins: a plugin weighs the groups in :meth:`update`.

    Subclasses set ``name`` (the registry name, also the key of the plugin's state in
    ``state_dict``), optionally ``version`` (bump it when the state layout changes) and
    ``Options`` (a :class:`PluginOptions` subclass), and implement :meth:`update`. A plugin that
    multiplies the incoming weights by factors read from the Gram matrix or the losses derives
    from :class:`~balancer.contract.weighting.GramWeighting`; one that acts at taps, from
    :class:`TapPlugin`.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "tap" in cls.__dict__ and not any(
            k.__module__ == __name__ and k.__name__ == "TapPlugin" for k in cls.__mro__
        ):
            raise TypeError(
                f"Plugin class `{cls.__name__}` defines tap() but derives from Plugin: derive it from "
                "balancer.TapPlugin instead (tapped gradients are shown to tap plugins only), and set "
                "acts_on_groups = True if its update() also weighs the groups."
            )
        if "name" in cls.__dict__:
            if getattr(cls.update, "__isabstractmethod__", False) or getattr(cls, "tap", None) is TapPlugin.tap:
                raise TypeError(f"Plugin `{cls.name}` must implement update(), tap(), or both.")

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    Options: ClassVar[type[PluginOptions]] = PluginOptions
    uses_taps: ClassVar[bool] = False
    """Whether tapped gradients are shown to this plugin (True for a :class:`TapPlugin`)."""
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

    def init(self) -> StateT:
        """Returns the initial state (a plain dict; built-ins declare its shape as a ``TypedDict``).
        Stateless plugins keep the default empty dict."""
        return cast(StateT, {})

    def check_state(self, state: StateT) -> None:
        """Raises :class:`InvalidStateError` (a ``ValueError``) if ``state`` is not one this plugin
        could have produced; the Balancer calls it on every state it restores from a checkpoint.

        The default checks the structure of :meth:`init` (see :func:`check_state_like`) and that
        floating values are finite except at the paths of :attr:`nonfinite_state`. Override it,
        calling ``super().check_state(state)`` first, to check what the structure cannot say (one
        entry per stored group name, a count that cannot be negative): a state that passes must
        not make :meth:`update` raise or silently drop a group.
        """
        check_state_like(state, self.init(), self.nonfinite_state)

    @abc.abstractmethod
    def update(self, stats: GroupStats, weights: Tensor, state: StateT) -> tuple[Tensor, StateT]:
        """Returns ``(new_weights, new_state)``.

        Args:
            stats: this step's statistics; ``stats.gram`` is float64 on the weights' device.
            weights: ``[k]`` float64 weights produced by the plugins before this one (ones for
                the first plugin). A plugin usually multiplies them by its own factors.
            state: the state returned by the previous call (or by :meth:`init`).

        Must not synchronise with the device (no ``.item()``, no Python ``if`` on tensor values)
        and must not modify ``state`` in place.
        """

    @property
    def acts_on_groups(self) -> bool:
        """Whether :meth:`update` weighs the groups with these options (a step that captured no
        group then balanced nothing, and the Balancer warns). True unless a subclass says otherwise."""
        return True

    @property
    def min_groups(self) -> int:
        """The fewest groups a step must have for :meth:`update` to be defined (1 for most plugins;
        ``krum`` needs ``n_byzantine + 3``). :meth:`update` raises :class:`~balancer.errors.PluginError`
        on fewer; :func:`~balancer.contract.testing.check_plugin` checks only sizes from here up."""
        return 1

    @property
    def needs_earlier_plugin(self) -> bool:
        """Whether :meth:`update` transforms the weights of the plugins before it instead of weighing
        the groups itself (``crmogm`` averages them over steps): placed first it would receive ones at
        every step and do nothing, so the Balancer refuses that order. False by default."""
        return False

    @property
    def needs_taps(self) -> bool:
        """Whether this plugin does nothing without ``opt.tap`` (the Balancer warns when a step saw no
        tapped gradient). Default: :attr:`uses_taps`; a tap plugin that only logs at taps says False."""
        return self.uses_taps

    def metrics(self, state: StateT) -> dict[str, Any]:
        """Numbers worth logging from the state after a step (tensors or floats); default none."""
        return {}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.options.model_dump().items())
        return f"{type(self).__name__}({fields})"


class TapPlugin(Plugin[StateT], Generic[StateT, TapStatsT]):
    """Base class of the plugins that see (and may rescale) tapped gradients: ``opt.tap(...)``.

    Subclasses implement :meth:`tap`, with :meth:`init_tap_stats` and :meth:`merge_tap_stats`
    when they accumulate statistics. A tap plugin does not weigh the groups unless it also
    implements :meth:`update` and says so in :attr:`acts_on_groups`.
    """

    uses_taps = True

    @property
    def acts_on_groups(self) -> bool:
        """False: a tap plugin weighs no group unless it overrides this (and :meth:`update`)."""
        return False

    def update(self, stats: GroupStats, weights: Tensor, state: StateT) -> tuple[Tensor, StateT]:
        """Passes the weights through: a tap plugin acts inside the backward pass."""
        return weights, state

    def init_tap_stats(self) -> TapStatsT:
        """The empty per-step accumulator of tap statistics.

        Every key the accumulator will ever hold must be here, with a tensor of its final
        dtype: at step time each tensor is summed over data-parallel ranks (zero-padded along
        dimension 0 to the longest rank's length, so per-class sums may grow), then handed to
        :meth:`merge_tap_stats`. A rank that saw no tap in a step contributes this value.
        """
        return cast(TapStatsT, {})

    @abc.abstractmethod
    def tap(self, event: TapEvent, state: StateT, tap_stats: TapStatsT) -> tuple[Tensor, TapStatsT]:
        """Sees the gradient arriving at an ``opt.tap(...)`` tensor; returns ``(grad, tap_stats)``.

        Runs inside the backward pass, once per tapped tensor and backward pass, in the
        plugins' order (each sees the gradient the previous one returned). ``state`` is this
        plugin's state as of the last step (read only); ``tap_stats`` is this step's
        accumulator, to be returned updated (not modified in place). Same rules as
        :meth:`update`: no host syncs.
        """

    def merge_tap_stats(self, state: StateT, tap_stats: TapStatsT) -> StateT:
        """Folds one step's accumulator, already summed over ranks, into the state (at step time)."""
        return state
