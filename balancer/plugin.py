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
    ``Options`` (a :class:`PluginOptions` subclass), and implement :meth:`update`.
    """

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

    @abc.abstractmethod
    def update(self, stats: GroupStats, weights: Tensor, state: State) -> tuple[Tensor, State]:
        """Returns ``(new_weights, new_state)``.

        Args:
            stats: this step's statistics; ``stats.gram`` is float64 on the weights' device.
            weights: ``[k]`` float64 weights produced by the plugins before this one (ones for
                the first plugin). A plugin usually multiplies them by its own factors.
            state: the state returned by the previous call (or by :meth:`init`).

        Must not synchronise with the device (no ``.item()``, no Python ``if`` on tensor values)
        and must not modify ``state`` in place.
        """

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.options.model_dump().items())
        return f"{type(self).__name__}({fields})"
