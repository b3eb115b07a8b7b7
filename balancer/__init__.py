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
4. clip and combine, then the inner step: :mod:`balancer.optimizer` (``Balancer``, the facade)
   with the step in ``balancer._step`` and the clip in ``balancer._clip``.

Around it: :mod:`balancer.config` (the validated configuration), :mod:`balancer.checkpoint`,
:mod:`balancer.errors`; the recipes for the seed papers (:mod:`balancer.recipes`: DPO, continual
learning, split-half estimates); the command line, metrics log and report (:mod:`balancer.tools`);
the GRPO demo (:mod:`balancer.demo`).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from balancer.config import BalancerConfig, PluginSpec, build_plugins, config_schema, load_config
from balancer.contract.hookspecs import hookimpl
from balancer.contract.plugin import InvalidStateError, Plugin, PluginOptions, State
from balancer.contract.registry import PluginInfo, Registry, default_registry, list_plugins
from balancer.contract.stats import GroupStats
from balancer.contract.tap_event import TapEvent
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
    "TapEvent",
    "__version__",
    "build_plugins",
    "config_schema",
    "default_registry",
    "hookimpl",
    "list_plugins",
    "load_config",
]
