"""What ``BalancedTrainer`` reads from its ``balancer=`` argument, and what it adds to ``Trainer``'s logs."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from balancer.config import BalancerConfig, build_plugins, resolve_config
from balancer.optimizer import Balancer

from ._hf_groups import TrainerSetupError

__all__ = ["BalancerSpec", "balancer_logs", "resolve_spec"]

BalancerSpec = BalancerConfig | Mapping[str, Any] | str | Path | list[Any] | tuple[Any, ...] | None


def resolve_spec(spec: BalancerSpec) -> tuple[list[Any], dict[str, Any]]:
    """The plugins and Balancer keyword arguments of ``balancer=``, validated now (errors at construction)."""
    if spec is None:
        return [], {}
    if isinstance(spec, list | tuple):
        return build_plugins(spec), {}
    if not isinstance(spec, BalancerConfig | Mapping | str | Path):
        raise TrainerSetupError(
            f"balancer= takes a list of plugins, a config dict, a BalancerConfig or a JSON file path; found "
            f"`{type(spec).__name__}`."
        )
    config, plugins = resolve_config(spec)
    kwargs = config.balancer_kwargs()
    if kwargs.pop("max_grad_norm") is not None:
        raise TrainerSetupError(
            f"balancer config sets max_grad_norm={config.max_grad_norm}: with Trainer, clip with "
            "TrainingArguments(max_grad_norm=...), which clips the balanced update; remove it from the config."
        )
    kwargs.pop("norm_type")
    return plugins, kwargs


def _scalar_logs(prefix: str, value: Any) -> dict[str, float]:
    """``{prefix: float}`` for a number or one-element tensor, flattened for a mapping, nothing otherwise."""
    if isinstance(value, Mapping):
        return {k: v for key, item in value.items() for k, v in _scalar_logs(f"{prefix}/{key}", item).items()}
    if isinstance(value, Tensor) and value.numel() == 1:
        return {prefix: float(value.item())}
    if isinstance(value, numbers.Real):
        return {prefix: float(value)}
    return {}


def balancer_logs(opt: Balancer) -> dict[str, float]:
    """The per-group norms and weights of the last step and every plugin's scalar metrics, as log entries:
    ``balancer/norm/<group>``, ``balancer/weight/<group>``, ``balancer/<plugin>/<metric>``."""
    logs: dict[str, float] = {}
    stats = opt.last_stats
    if stats is not None:
        logs.update({f"balancer/norm/{n}": v for n, v in zip(stats.names, stats.norms.tolist(), strict=True)})
        if stats.weights is not None:
            weights = stats.weights.tolist()
            logs.update({f"balancer/weight/{n}": v for n, v in zip(stats.names, weights, strict=True)})
    for plugin, metrics in opt.plugin_metrics().items():
        logs.update(_scalar_logs(f"balancer/{plugin}", metrics))
    return logs
