"""Hugging Face accelerate without ``Trainer``: a Balancer in a hand-written accelerate loop.

Needs the ``hf`` extra (``pip install 'gradient-balancer[hf]'``). Recipe (docs: accelerate-lightning.md)::

    from balancer.integrations.accelerate import prepare

    accelerator = Accelerator()                       # or Accelerator(deepspeed_plugin=...)
    model, optimizer, loader = prepare(accelerator, model, Balancer(AdamW(model.parameters()),
                                                                    plugins=["task_norm"]), loader)
    opt = balancer.unwrap(optimizer)                  # the Balancer that captures the groups
    for batch in loader:
        with accelerator.accumulate(model):
            for name, part in batch.items():
                with opt.group(name):
                    accelerator.backward(loss_fn(model(part["x"]), part["y"]))
            accelerator.clip_grad_norm_(model.parameters(), 1.0)   # clips the balanced update
            optimizer.step()
            optimizer.zero_grad()

:func:`prepare` is ``accelerator.prepare`` plus two things:

- **Clipping.** While groups are pending ``.grad`` does not hold the update, so accelerate's
  ``clip_grad_norm_`` (torch's rule on ``.grad``) would measure nothing and clip nothing. On this
  accelerator instance, ``accelerator.clip_grad_norm_(parameters, ...)`` is routed to the
  Balancer's :meth:`~balancer.Balancer.clip_grad_norm_` when ``parameters`` cover the Balancer's
  trained parameters (it clips the balanced update, or ``.grad`` as torch does when nothing is
  pending); a call on only some of them while groups are pending raises a
  :class:`~balancer.errors.CaptureError`. Other parameters go to accelerate as before.
- **DeepSpeed** (``accelerator.distributed_type == DEEPSPEED``). DeepSpeed is given the Balancer's
  inner optimizer; the Balancer returned in its place sits on the engine
  (:func:`balancer.integrations._hf_deepspeed.wrap_deepspeed_engine`, the same plugins and options,
  the exact statistics of :mod:`balancer.integrations.deepspeed`): the ``engine.step()`` that
  ``accelerator.backward`` runs is deferred while groups are pending, and ``optimizer.step()``
  (the Balancer's) combines them and steps the engine. DeepSpeed's ``gradient_clipping`` clips the
  balanced update; ``accelerator.clip_grad_norm_`` with pending groups then raises (it would clip
  twice), so leave clipping to DeepSpeed, or set ``gradient_clipping`` to 0 and clip through
  accelerate. Refused with :class:`~balancer.integrations.deepspeed.DeepSpeedUnsupportedError`:
  ``gradient_accumulation_steps`` other than 1 (each group's backward must be a reduction
  boundary; loop over micro-batches inside the step instead), offload, and the other settings of
  :mod:`balancer.integrations._deepspeed_checks`.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

from balancer import Balancer
from balancer.errors import BalancerError, CaptureError

__all__ = ["prepare"]


def prepare(accelerator: Any, *args: Any, **kwargs: Any) -> Any:
    """``accelerator.prepare(*args, **kwargs)`` for arguments that include a :class:`~balancer.Balancer`.

    Returns what ``accelerator.prepare`` returns (one object, or a tuple in the order given). The
    Balancer comes back wrapped as accelerate wraps any optimizer (``balancer.unwrap`` finds it);
    under DeepSpeed it comes back as a Balancer on the engine (see the module docstring). Either
    way ``accelerator.clip_grad_norm_`` is routed to it.
    """
    balancers = [i for i, a in enumerate(args) if isinstance(a, Balancer)]
    if len(balancers) > 1:
        raise BalancerError(
            f"prepare(): {len(balancers)} Balancers given (arguments {balancers}); one Balancer balances all groups "
            "of a model: wrap one optimizer and list every plugin there."
        )
    deepspeed = _is_deepspeed(accelerator)
    given = list(args)
    if deepspeed and balancers:
        original: Balancer = args[balancers[0]]
        if original.backend.names:
            raise CaptureError(f"prepare(): the Balancer has pending groups {list(original.backend.names)}.")
        given[balancers[0]] = original.inner  # DeepSpeed steps the plain optimizer on its partitions
    prepared = accelerator.prepare(*given, **kwargs)
    if not balancers:
        return prepared
    result = list(prepared) if len(args) > 1 else [prepared]
    if deepspeed:
        from ._hf_deepspeed import balancer_options, wrap_deepspeed_engine

        opt = wrap_deepspeed_engine(accelerator.deepspeed_engine_wrapped.engine, **balancer_options(original))
        opt.load_balancer_state_dict(original.balancer_state_dict())  # plugin states and step count carry over
        result[balancers[0]] = opt
    else:
        opt = args[balancers[0]]
    _route_clipping(accelerator, opt)
    return tuple(result) if len(args) > 1 else result[0]


def _is_deepspeed(accelerator: Any) -> bool:
    return bool(accelerator.distributed_type == "DEEPSPEED")  # accelerate's DistributedType is a str enum


def _route_clipping(accelerator: Any, opt: Balancer) -> None:
    """Makes ``accelerator.clip_grad_norm_`` (on this instance only) clip through ``opt`` where
    ``opt`` holds the gradients it is asked about."""
    routed: list[weakref.ref[Balancer]] = accelerator.__dict__.setdefault("_balancer_clip_routes", [])
    routed.append(weakref.ref(opt))
    if "clip_grad_norm_" in accelerator.__dict__:
        return
    original = accelerator.clip_grad_norm_

    def clip_grad_norm_(parameters: Iterable[Any], max_norm: float, norm_type: float | str = 2) -> Any:
        params = list(parameters)
        given = {id(p) for p in params}
        for ref in routed:
            bal = ref()
            if bal is None:
                continue
            trained = {id(p) for p in bal.backend.trained_parameters()}
            others = [p for p in params if id(p) not in trained and getattr(p, "grad", None) is not None]
            if trained <= given and not others:
                return bal.clip_grad_norm_(max_norm, norm_type, scaler=getattr(accelerator, "scaler", None))
            if trained & given and bal.backend.names:
                raise CaptureError(
                    "accelerator.clip_grad_norm_: the parameters given are only partly the Balancer's "
                    f"({len(trained & given)} of its {len(trained)} trained parameters, {len(others)} others with "
                    f"gradients) while groups {list(bal.backend.names)} are pending, and .grad does not hold their "
                    "update. Fix: pass all of the model's parameters (model.parameters()), or call "
                    "opt.clip_grad_norm_(max_norm) on the Balancer."
                )
        return original(params, max_norm, norm_type)

    accelerator.__dict__["clip_grad_norm_"] = clip_grad_norm_
