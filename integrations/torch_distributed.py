"""Backends for torch data parallelism: DDP (replicated gradients) and FSDP2 (sharded gradients).

Both keep the local backend's flat ``[k, n]`` rows and ``.grad`` views; they differ in what a
row holds and how the Gram matrix becomes global:

- **DDP** (:class:`ReplicatedBackend`): DDP averages each group's gradient during that group's
  backward, straight into the row, so every rank holds the same rows. Each rank computes the
  Gram of its ``1/W`` slice of columns and one all-reduce of the ``k×k`` matrix sums them: the
  exact global statistics for ``1/W`` of the work. ``no_sync()``: inside a group block it may
  wrap every backward but the last one of that group in the step (DDP then reduces the
  accumulated row in the last one); a group whose backward passes all ran under ``no_sync``
  would hold rank-local gradients, which the first step detects and refuses.
- **FSDP2** (:class:`ShardedBackend`, ``fully_shard``): parameters and gradients are ``DTensor``
  shards. The rows hold this rank's shard of each group gradient (FSDP2's reduce-scatter
  accumulates into the row's ``DTensor`` view), the Gram matrix is the sum over ranks of the
  local-shard Gram matrices, and the combination stays local.

Every capture event (entering a group, stepping) is checked across ranks first, so ranks that
disagree on the groups all raise :class:`~balancer.errors.GroupMismatchError` instead of hanging.
Under DDP every backward pass, and every forward in which DDP communicates, is a checked event
too (:mod:`._ddp_passes`): DDP's own collectives in those passes would otherwise meet another
rank's check when the ranks differ in the passes of a group. FSDP2 checks only entering and
stepping: its forwards and backward passes all-gather parameters (see :class:`ShardedBackend`).
Not supported yet, refused with a clear error: 2-D meshes (HSDP, tensor parallel), and
parameters that are ``DTensor`` with a ``Replicate`` placement.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from balancer.capture.flat_buffer import FlatBuffer, TensorKind
from balancer.capture.local import LocalBackend
from balancer.contract.combine import BoundRule
from balancer.errors import CaptureError

from ._agreement import RankAgreement, RankReductions
from ._ddp_passes import PassChecks

__all__ = ["ReplicatedBackend", "ShardedBackend", "backend_for"]


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _DistributedMixin(RankReductions, LocalBackend):
    """What DDP and FSDP2 share: rank agreement, reducing the Gram matrix and the losses."""

    def _setup(self, group: dist.ProcessGroup | None) -> None:
        self._world = dist.get_world_size(group)
        self._rank = dist.get_rank(group)
        self._agreement = RankAgreement(group, _collective_device(group))

    def _agree(self, event: str) -> None:
        self._agreement.check(event)

    def _reduce_gram(self, gram: Tensor) -> Tensor:
        return self._agreement.sum(gram)


class ReplicatedBackend(_DistributedMixin):
    """DDP: rows hold the rank-averaged group gradients, identical on every rank."""

    def __init__(self, optimizer: torch.optim.Optimizer, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(optimizer)
        self._setup(group)
        self._verified = False
        self._passes = PassChecks(self, self._agreement)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_passes"}  # hooks are not copied: remade

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._passes = PassChecks(self, self._agreement)

    def _agree(self, event: str) -> None:
        self._agreement.check(f"{event} ({self._passes.tally()})")

    @torch.no_grad()
    def combine(self, weights: Tensor, *, scale: float | Tensor = 1.0, rule: BoundRule | None = None) -> None:
        if not self._names:  # a step with groups was checked by gram(); one without is checked here
            self._agree("step() without groups")
        super().combine(weights, scale=scale, rule=rule)

    def end_step(self) -> None:
        super().end_step()
        self._passes.reset()
        self._passes.stop_discovery()  # every DDP module of the model has run a forward by now
        self._passes.hook(self._params())

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool) -> None:
        super().zero_grad(set_to_none)
        self._passes.reset()

    def _columns(self, buf: FlatBuffer) -> slice:
        chunk = math.ceil(buf.n / self._world)
        return slice(min(buf.n, self._rank * chunk), min(buf.n, (self._rank + 1) * chunk))

    @torch.no_grad()
    def gram(self, *, ungrouped: bool = False) -> Tensor:
        gram = super().gram(ungrouped=ungrouped)
        m = len(self.names)
        if not self._verified and m:
            self._verify_replicated(gram[:m, :m])
            self._verified = True
        return gram

    def _verify_replicated(self, gram: Tensor) -> None:
        m = len(self.names)
        local = sum(buf.gram(m).to(gram) for buf in self.buffers)
        scale = gram.diagonal().abs().max().clamp_min(torch.finfo(torch.float64).tiny)
        differs = ((local - gram).abs().max() > 1e-4 * scale) & torch.isfinite(gram).all()
        flag = self._agreement.sum(differs.to(torch.float64).reshape(1))
        if flag.item() > 0:
            raise CaptureError(
                "Group gradients differ across data-parallel ranks, so they were not averaged: wrap the model in "
                "DistributedDataParallel, and let the last backward of every group synchronize (use no_sync() "
                "only on the earlier backward passes of a group). DDP averages only the first backward pass after "
                "each forward: losses of several groups from one forward (opt.backward on a shared graph) need one "
                "more synchronized forward and backward per group, or a forward per group."
            )


class DTensorKind(TensorKind):
    """Gradients of FSDP2 parameters: ``DTensor`` views whose local data lies in the rows."""

    @staticmethod
    def local(tensor: Tensor) -> Tensor:
        return tensor._local_tensor if isinstance(tensor, DTensor) else tensor

    @staticmethod
    def wrap(param: Tensor, local_view: Tensor) -> Tensor:
        assert isinstance(param, DTensor)
        return DTensor.from_local(
            local_view, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )


class ShardedBackend(_DistributedMixin):
    """FSDP2: rows hold this rank's shard of every group gradient.

    Only entering a group and stepping are checked across ranks, not the passes inside a group:
    FSDP2 all-gathers parameters in every forward, and in every backward pass before any parameter
    gradient exists, so ranks that differ in the forward or backward passes of a group (an extra
    micro-batch, a group block left early) still block in those collectives (a hang on gloo too).
    """

    kind = DTensorKind

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        meshes = {p.device_mesh for p in params if isinstance(p, DTensor)}
        plain = [tuple(p.shape) for p in params if not isinstance(p, DTensor)]
        if plain or len(meshes) != 1:
            raise CaptureError(
                "FSDP2: every optimized parameter must be a DTensor on one device mesh. Found "
                f"{len(plain)} plain tensor(s) {plain[:3]} and {len(meshes)} mesh(es). Apply fully_shard to the "
                "whole model (the root module too) before building the optimizer."
            )
        mesh = meshes.pop()
        if mesh.ndim != 1 or any(not all(isinstance(pl, Shard) for pl in p.placements) for p in params):
            raise CaptureError(
                f"FSDP2 with a {mesh.ndim}-D mesh or non-Shard placements (HSDP, tensor parallel) is not supported "
                "yet: the Gram matrix would count replicated elements more than once. Use a 1-D fully_shard mesh."
            )
        self._setup(mesh.get_group())

    def _shard_start(self, param: Tensor) -> int:
        """For combine rules: the global flat index of this rank's first element of ``param``. A
        ``Shard(0)`` shard is the contiguous chunk ``torch.chunk`` gives this rank; other placements
        would scatter the local elements over the global order and are refused."""
        assert isinstance(param, DTensor)
        placement = param.placements[0]
        if not isinstance(placement, Shard) or placement.dim != 0:
            raise CaptureError(
                f"A combine rule needs FSDP2 shards along dimension 0 (found {param.placements} for a parameter of "
                f"shape {tuple(param.shape)}): drop shard_placement_fn, or use a weighting plugin."
            )
        rows = param.shape[0] if param.dim() else 1
        chunk = math.ceil(rows / self._world)
        first = min(rows, param.device_mesh.get_local_rank() * chunk)
        local = DTensorKind.local(param)
        per_row = param.numel() // max(rows, 1)
        assert local.numel() == (min(rows, first + chunk) - first) * per_row, "FSDP2 shard is not torch.chunk's"
        return first * per_row

    def _reduce_norm(self, norm: Tensor, norm_type: float) -> Tensor:
        """The norm of the whole update from each rank's norm of its shard (the L2 norm comes from
        the Gram matrix instead): the max over ranks, or ``(Σ_ranks ‖shard‖_p^p)^(1/p)``."""
        if math.isinf(norm_type):
            return self.all_reduce(norm, "max")
        return self.all_reduce(norm.pow(norm_type), "sum").pow(1.0 / norm_type)


def backend_for(optimizer: torch.optim.Optimizer) -> LocalBackend:
    """DDP or FSDP2 backend for an optimizer of a model under ``torch.distributed``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(isinstance(p, DTensor) for p in params):
        return ShardedBackend(optimizer)
    return ReplicatedBackend(optimizer)
