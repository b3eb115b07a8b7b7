"""The ``torch.optim.Optimizer`` contract of a wrapper, forwarded to the optimizer it wraps.

:class:`ForwardingOptimizer` is what makes the :class:`~balancer.Balancer` a drop-in optimizer:
``param_groups``, ``state`` and ``defaults`` are the inner optimizer's (properties with setters,
never copies), so LR schedulers and ``GradScaler`` act on the wrapped optimizer; the step and
state-dict hook registries of ``torch.optim.Optimizer`` exist and run; pickling leaves the hooks
out, as torch does. It never takes ownership of the parameters (``Optimizer.__init__`` is not
called).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

__all__ = ["ForwardingOptimizer"]

_HOOK_REGISTRIES = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class ForwardingOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose parameters and state are those of ``self._inner``.

    Subclasses set ``self._inner``, then call :meth:`_init_optimizer_machinery`; they extend the
    state dict through :meth:`_save_state` and :meth:`_load_state`.
    """

    _inner: torch.optim.Optimizer

    def _init_optimizer_machinery(self) -> None:
        """What ``Optimizer.__init__`` sets up (hook registries, the profiled step), without the parameters."""
        for attr in _HOOK_REGISTRIES:
            if attr not in self.__dict__:
                setattr(self, attr, OrderedDict())
        self._patch_step_function()

    # -- forwarding: properties with setters, never aliased copies ---------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._inner.param_groups = value

    @property
    def state(self) -> Any:
        return self._inner.state

    @state.setter
    def state(self, value: Any) -> None:
        self._inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self._inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._inner.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._inner.add_param_group(param_group)

    @property
    def inner(self) -> torch.optim.Optimizer:
        """The wrapped optimizer."""
        return self._inner

    # -- state dicts, with torch's hooks around them -----------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus the wrapper's own (the Balancer adds a ``"balancer"``
        section with every plugin's state), between torch's state-dict hooks."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self._save_state()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a :meth:`state_dict` (the Balancer checks that its plugin list matches the saved one first)."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load_state(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _save_state(self) -> dict[str, Any]:
        """What :meth:`state_dict` returns, before its post-hooks (subclasses add their sections)."""
        return self._inner.state_dict()

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        """Restores a :meth:`_save_state` (after the pre-hooks of :meth:`load_state_dict`)."""
        self._inner.load_state_dict(state_dict)

    # -- pickling ----------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in _HOOK_REGISTRIES}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_optimizer_machinery()
