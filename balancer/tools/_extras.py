"""The optional ``demo`` extra: matplotlib, numpy and tqdm, needed by ``balancer demo`` and ``balancer report`` only."""

from __future__ import annotations

from balancer.errors import BalancerError

__all__ = ["DEMO_EXTRA", "MissingExtraError", "missing_extra"]

DEMO_EXTRA = 'pip install "gradient-balancer[demo]"'


class MissingExtraError(BalancerError, ImportError):
    """A package of an optional extra is not installed; the message says what to install."""


def missing_extra(exc: ImportError) -> MissingExtraError:
    """The error to raise (``from exc``) when importing a package of the ``demo`` extra failed."""
    package = (exc.name or "a package of the demo extra").split(".")[0]
    return MissingExtraError(
        f"`balancer demo` and `balancer report` need `{package}`, which is not installed "
        f"({type(exc).__name__}: {exc}); install the demo extra: {DEMO_EXTRA}"
    )
