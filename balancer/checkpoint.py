"""Distributed checkpoints (``torch.distributed.checkpoint``) with the Balancer's plugin state.

DCP saves and loads nested state dicts in place and keeps only the keys it knows for an
optimizer (``get_optimizer_state_dict`` drops the ``"balancer"`` section of
:meth:`Balancer.state_dict`). Plugin states also change structure as they run (an EMA per group
name appears with the group), which in-place loading cannot follow. So the section travels as
one opaque entry: :class:`BalancerState` serialises it with ``torch.save`` and restores it with
``torch.load(weights_only=True)``. Every rank holds the same section (plugin states are never
updated from rank-local numbers), so it does not matter which rank writes it.

Example (FSDP2 or DDP; the inner optimizer's state goes through DCP's own helpers)::

    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from balancer.checkpoint import BalancerState

    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt.inner),
             "balancer": BalancerState(opt)}
    dcp.save(state, checkpoint_id=path)
    ...
    dcp.load(state, checkpoint_id=path)          # BalancerState restores the plugin states itself
    set_optimizer_state_dict(model, opt.inner, state["optim"])
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from balancer.optimizer import Balancer

__all__ = ["BalancerState"]


class BalancerState:
    """A ``torch.distributed.checkpoint`` ``Stateful`` holding ``opt.balancer_state_dict()``."""

    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer

    def state_dict(self) -> dict[str, Any]:
        buffer = io.BytesIO()
        torch.save(self.balancer.balancer_state_dict(), buffer)
        return {"section": buffer.getvalue()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        section = torch.load(io.BytesIO(state_dict["section"]), weights_only=True)
        self.balancer.load_balancer_state_dict(section)
