"""gradient-balancer: per-group gradient balancing for any torch optimizer.

``Balancer(inner, plugins=[...])`` wraps a ``torch.optim.Optimizer``. Gradients are tagged by
group (``with opt.group(name): loss.backward()``); plugins turn per-group statistics into
weights before the wrapped optimizer steps.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .config import BalancerConfig, PluginSpec, build_plugins, config_schema, load_config
from .errors import (
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
from .hookspecs import hookimpl
from .metrics import MetricsLogger
from .optimizer import Balancer
from .plugin import InvalidStateError, Plugin, PluginOptions, State
from .registry import PluginInfo, Registry, default_registry, list_plugins
from .split_half import SplitHalf
from .stats import GroupStats

try:
    __version__ = version("gradient-balancer")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "Balancer",
    "BalancerConfig",
    "BalancerError",
    "BalancerWarning",
    "CaptureError",
    "ConfigError",
    "GroupMismatchError",
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
    "__version__",
    "build_plugins",
    "config_schema",
    "default_registry",
    "hookimpl",
    "list_plugins",
    "load_config",
]
