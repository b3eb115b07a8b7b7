"""A Balancer on the DeepSpeed engine that accelerate (and so ``transformers.Trainer``) drives.

Accelerate's ``DeepSpeedEngineWrapper.backward`` runs ``engine.backward(loss)`` and then, on every
synchronising step, ``engine.step()``, inside ``accelerator.backward``: there is no moment between
the last group's backward and the engine's step. The Balancer built here sits on the engine with
the DeepSpeed backend of :mod:`balancer.integrations.deepspeed` (the same capture and statistics),
in the mode where such an ``engine.step()`` with captured gradients is deferred; ``opt.step()``
combines the groups and steps the engine once. The optimizer that DeepSpeed wraps must be the
plain torch optimizer, not a Balancer: a Balancer handed to ``deepspeed.initialize`` would only
see DeepSpeed's flat partitions, one parameter group at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from balancer import Balancer
from balancer.errors import BalancerError

from ._deepspeed_backend import DeepSpeedBackend

__all__ = ["balancer_options", "wrap_deepspeed_engine"]


def _client_optimizer(engine: Any) -> Any:
    return getattr(engine, "basic_optimizer", None) or getattr(engine, "optimizer", None)


def wrap_deepspeed_engine(engine: Any, plugins: Iterable[Any] = (), **balancer_kwargs: Any) -> Balancer:
    """A :class:`~balancer.Balancer` on ``engine`` for loops in which the framework steps the engine.

    Same capture, statistics and refusals as ``Balancer(engine, plugins)`` (see
    :mod:`balancer.integrations.deepspeed`), except that ``engine.step()`` called while gradients
    are captured (accelerate calls it at the end of ``accelerator.backward``) is deferred instead of
    refused: it does nothing, and ``opt.step()`` combines the groups, then steps the engine once.
    So use the returned Balancer as the optimizer of the loop: ``with opt.group(name):
    accelerator.backward(loss)`` for each group, then ``opt.step()`` and ``opt.zero_grad()``.

    Args:
        engine: the ``DeepSpeedEngine`` (``accelerator.deepspeed_engine_wrapped.engine``, or the
            model ``accelerator.prepare`` returned under DeepSpeed). Its optimizer must be a plain
            torch optimizer (or one from the DeepSpeed config), not a Balancer.
        plugins, balancer_kwargs: as for :class:`~balancer.Balancer` (``on_nonfinite``,
            ``max_grad_norm``, ``norm_type``).

    Raises:
        DeepSpeedUnsupportedError: an engine configuration the backend cannot balance exactly
            (offload, pipeline/tensor parallelism, ``gradient_accumulation_steps`` other than 1, ...).
        BalancerError: the engine's optimizer is itself a Balancer.
    """
    client = _client_optimizer(engine)
    if isinstance(client, Balancer):
        raise BalancerError(
            "The DeepSpeed engine's optimizer is a Balancer: DeepSpeed steps it on its own flat partitions, where "
            "it cannot see the group gradients. Give DeepSpeed (accelerator.prepare / deepspeed.initialize) the "
            "plain torch optimizer (balancer.inner) and build the Balancer on the engine afterwards, or use "
            "balancer.integrations.accelerate.prepare, which does both."
        )
    backend = DeepSpeedBackend(engine, step_inside_backward=True)
    return Balancer(engine, plugins, backend=backend, **balancer_kwargs)


def balancer_options(opt: Balancer) -> dict[str, Any]:
    """The construction options of ``opt`` that carry over to a Balancer on another target: its
    plugins (the same instances; a plugin keeps no state of its own), ``on_nonfinite``,
    ``max_grad_norm`` and ``norm_type``."""
    clip = getattr(opt, "_clip", None)
    return {
        "plugins": opt.plugins,
        "on_nonfinite": opt.on_nonfinite,
        "max_grad_norm": opt.max_grad_norm,
        "norm_type": 2.0 if clip is None else clip.norm_type,
    }
