"""The exceptions and warnings of ``balancer``: one small hierarchy rooted at :class:`BalancerError`."""

from __future__ import annotations

__all__ = [
    "BalancerError",
    "BalancerWarning",
    "CaptureError",
    "ConfigError",
    "GroupMismatchError",
    "NonFiniteGradientError",
    "NonFiniteGradientWarning",
    "PluginError",
    "PluginLoadError",
    "PluginWarning",
    "StateDictError",
]


class BalancerError(Exception):
    """Base class of every error raised by ``balancer``."""


class CaptureError(BalancerError):
    """Group capture was used the wrong way (nested groups, ``step()`` inside a group, bad names...)."""


class GroupMismatchError(CaptureError):
    """Data-parallel ranks disagree on the groups of a step; raised on every rank instead of a hang."""


class ConfigError(BalancerError, ValueError):
    """A configuration is invalid. ``errors`` lists every problem found, each as ``(path, message)``."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = list(errors)
        lines = [f"  - {path or '<root>'}: {message}" for path, message in self.errors]
        count = len(self.errors)
        super().__init__(
            f"Invalid balancer configuration ({count} error{'s' if count != 1 else ''}):\n" + "\n".join(lines)
        )


class PluginError(BalancerError):
    """A plugin misbehaved at step time (wrong weight shape, non-finite weights, bad state)."""


class PluginLoadError(BalancerError):
    """A plugin could not be found, imported or registered."""


class StateDictError(BalancerError):
    """A state dict does not fit this Balancer (different plugins, missing sections)."""


class NonFiniteGradientError(BalancerError, FloatingPointError):
    """A group gradient contains NaN or inf and the Balancer was told to raise."""


class BalancerWarning(UserWarning):
    """Base class of every warning of ``balancer``; also raised as is when a step did something other
    than what the configuration suggests (plugins that balanced nothing, losses they never saw)."""


class NonFiniteGradientWarning(BalancerWarning):
    """A group gradient contained NaN or inf; that group got weight 0 for this step."""


class PluginWarning(BalancerWarning):
    """A third-party plugin failed to load, or lost a name clash; the others still work."""
