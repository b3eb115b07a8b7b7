"""gradient-balancer: per-group gradient balancing for any torch optimizer.

``Balancer(inner, plugins=[...])`` wraps a ``torch.optim.Optimizer``. Gradients are tagged by
group (``with opt.group(name): loss.backward()``); plugins turn per-group statistics into
weights before the wrapped optimizer steps.

Where a gradient goes, and where each part lives:

1. capture (:mod:`balancer.capture`): each group's gradient lands in a row of a flat buffer
   (``capture.local``, ``capture.flat_buffer``), or the layer capture keeps per-layer factors
   (``capture.layer_capture``); taps show gradients to plugins inside the backward pass
   (``capture.taps``). Data-parallel backends extend this in :mod:`balancer.integrations`.
2. stats: the Gram matrix of the rows, reduced over ranks (``GroupStats``, the ``Backend``
   protocol: :mod:`balancer.contract`).
3. weights: the plugins in the user's order (:mod:`balancer.contract.plugin`; built-ins in
   :mod:`balancer.plugins`, third-party ones found through :mod:`balancer.contract.registry`).
4. clip and combine, then the inner step: :mod:`balancer.step` (planned, then committed only if
   the inner step succeeds), driven by :mod:`balancer.optimizer` (``Balancer``, the facade).

Around it: :mod:`balancer.config` (the validated configuration), :mod:`balancer.checkpoint`,
:mod:`balancer.errors`; the recipes for the seed papers (:mod:`balancer.recipes`: DPO, continual
learning, split-half estimates); the command line, metrics log and report (:mod:`balancer.tools`);
the GRPO demo (:mod:`balancer.demo`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from balancer.errors import __all__ as _ERROR_NAMES  # plain Python, no torch

if TYPE_CHECKING:
    from balancer._unwrap import unwrap
    from balancer.config import BalancerConfig, PluginSpec, build_plugins, config_schema, load_config
    from balancer.contract.hookspecs import hookimpl
    from balancer.contract.plugin import InvalidStateError, Plugin, PluginOptions, State, TapPlugin
    from balancer.contract.registry import PluginInfo, Registry, default_registry, list_plugins
    from balancer.contract.stats import GroupStats
    from balancer.contract.tap_event import TapEvent
    from balancer.contract.weighting import GramWeighting
    from balancer.errors import (
        BalancerError,
        BalancerWarning,
        CaptureError,
        ConfigError,
        GroupMismatchError,
        NonFiniteGradientError,
        NonFiniteGradientWarning,
        PluginError,
        PluginLoadError,
        PluginWarning,
        StateDictError,
    )
    from balancer.optimizer import Balancer
    from balancer.recipes.split_half import SplitHalf
    from balancer.tools.metrics import MetricsLogger

    __version__: str

# The public names are imported on first use (PEP 562), so that `import balancer` and the
# `balancer` command start without importing torch. Name -> the module that defines it.
_LAZY: dict[str, str] = {
    "Balancer": "balancer.optimizer",
    "BalancerConfig": "balancer.config",
    "PluginSpec": "balancer.config",
    "build_plugins": "balancer.config",
    "config_schema": "balancer.config",
    "load_config": "balancer.config",
    "hookimpl": "balancer.contract.hookspecs",
    "InvalidStateError": "balancer.contract.plugin",
    "Plugin": "balancer.contract.plugin",
    "PluginOptions": "balancer.contract.plugin",
    "State": "balancer.contract.plugin",
    "TapPlugin": "balancer.contract.plugin",
    "GramWeighting": "balancer.contract.weighting",
    "PluginInfo": "balancer.contract.registry",
    "Registry": "balancer.contract.registry",
    "default_registry": "balancer.contract.registry",
    "list_plugins": "balancer.contract.registry",
    "GroupStats": "balancer.contract.stats",
    "TapEvent": "balancer.contract.tap_event",
    **dict.fromkeys(_ERROR_NAMES, "balancer.errors"),  # every exception and warning class
    "SplitHalf": "balancer.recipes.split_half",
    "MetricsLogger": "balancer.tools.metrics",
    "unwrap": "balancer._unwrap",
}

__all__ = [
    "Balancer",
    "BalancerConfig",
    "BalancerError",
    "BalancerWarning",
    "CaptureError",
    "ConfigError",
    "GroupMismatchError",
    "GramWeighting",
    "GroupStats",
    "InvalidStateError",
    "MetricsLogger",
    "NonFiniteGradientError",
    "NonFiniteGradientWarning",
    "Plugin",
    "PluginError",
    "PluginInfo",
    "PluginLoadError",
    "PluginOptions",
    "PluginSpec",
    "PluginWarning",
    "Registry",
    "SplitHalf",
    "State",
    "StateDictError",
    "TapEvent",
    "TapPlugin",
    "__version__",
    "build_plugins",
    "config_schema",
    "default_registry",
    "hookimpl",
    "list_plugins",
    "load_config",
    "unwrap",
]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradient-balancer")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree that is not installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    """Imports a public name (or a sub-module such as ``balancer.optimizer``) on first use."""
    if name == "__version__":
        value: Any = _version()
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
