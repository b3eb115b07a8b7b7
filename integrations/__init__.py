"""Framework glue for ``balancer``: backends for DDP, FSDP2 and DeepSpeed.

This module is the ``integrations`` entry point of the project (group ``balancer``): its
:func:`balancer_make_backend` hook picks the backend for what ``Balancer(...)`` is given. Each
framework is imported only when it is in use; DeepSpeed needs the ``deepspeed`` extra
(``pip install 'gradient-balancer[deepspeed]'``).
"""

from __future__ import annotations

from typing import Any

import torch

from balancer import hookimpl
from balancer.contract.backend import Backend


def _is_deepspeed_engine(target: Any) -> bool:
    return any(
        cls.__name__ == "DeepSpeedEngine" and cls.__module__.startswith("deepspeed") for cls in type(target).__mro__
    )


def _data_parallel() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@hookimpl
def balancer_make_backend(target: Any) -> Backend | None:
    if _is_deepspeed_engine(target):
        from .deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(target)
    if isinstance(target, torch.optim.Optimizer) and _data_parallel():
        from .torch_distributed import backend_for

        return backend_for(target)
    return None
