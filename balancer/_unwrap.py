"""``balancer.unwrap(optimizer)``: the :class:`~balancer.Balancer` inside a framework's optimizer wrapper.

Frameworks hand the training loop their own wrapper around the optimizer they were given:
accelerate's ``AcceleratedOptimizer`` (also what ``transformers.Trainer`` keeps in
``trainer.optimizer``) holds it in ``.optimizer``, Lightning's ``LightningOptimizer`` in
``._optimizer``. Calls that only the Balancer has (``group``, ``backward``, ``last_stats``,
``plugin_metrics``) need the Balancer itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from balancer.optimizer import Balancer

__all__ = ["unwrap"]

# Where each known wrapper keeps the optimizer it wraps, tried in this order.
_WRAPPED_ATTRIBUTES = ("optimizer", "_optimizer")
_MAX_DEPTH = 8  # wrappers of wrappers; more than this is a cycle


def unwrap(optimizer: Any) -> Balancer:
    """Returns the :class:`~balancer.Balancer` that ``optimizer`` is, or that it wraps.

    Looks through accelerate's ``AcceleratedOptimizer`` (``.optimizer``), Lightning's
    ``LightningOptimizer`` (``._optimizer``) and wrappers of the same shape, any number deep
    (e.g. ``trainer.optimizer`` in a ``transformers.Trainer``).

    Raises:
        TypeError: no Balancer is inside; the message names every type found on the way.
    """
    from balancer.optimizer import Balancer

    seen: list[str] = []
    current = optimizer
    for _ in range(_MAX_DEPTH):
        if isinstance(current, Balancer):
            return current
        seen.append(f"{type(current).__module__}.{type(current).__qualname__}")
        inner = next((getattr(current, a) for a in _WRAPPED_ATTRIBUTES if getattr(current, a, None) is not None), None)
        if inner is None or inner is current:
            break
        current = inner
    raise TypeError(
        f"balancer.unwrap: no Balancer inside `{' -> '.join(seen)}`. The training loop was given an optimizer "
        "that is not a Balancer, so group gradients cannot be captured. Fix: wrap the optimizer before handing "
        "it to the framework, e.g. Balancer(torch.optim.AdamW(model.parameters()), plugins=[...]), or use the "
        "integration (balancer.integrations.transformers.BalancedTrainer)."
    )
