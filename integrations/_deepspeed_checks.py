"""Which DeepSpeed configurations the Balancer supports, checked once when the backend is built.

Supported (exact: the parameters match a single process on the global batch): ZeRO stages 0, 1,
2 and 3 with pure data parallelism, fp32 or bf16, with or without ``overlap_comm`` /
``contiguous_gradients``, any ``gradient_clipping`` (DeepSpeed clips the balanced update), one
``engine(...)`` forward and one ``engine.backward(...)`` per group block (several backward passes
per block, or re-entering a group, add up within the group).

Refused, each with :class:`DeepSpeedUnsupportedError` naming the setting, its value and the fix:

- pipeline, tensor (AutoTP / Megatron ``mpu``) and sequence parallelism, MoE expert parallelism:
  gradients of model-parallel or replicated parameters would have to be counted per DeepSpeed's
  own norm rules (one TP rank for replicated parameters, none for tied pipeline copies), which
  this backend does not implement, so its Gram matrix would be wrong;
- CPU/NVMe offload of optimizer or parameters: DeepSpeed then caches per-parameter gradient
  norms and accumulates in separate CPU buffers during backward, which the backend does not
  rewrite, so clipping and the step would read stale values;
- ``gradient_accumulation_steps != 1`` and ``managed_gradient_accumulation: false``: every group's
  backward must be an accumulation boundary so that its gradient is reduced before the next
  group's arrives; accumulate by calling ``engine.backward`` several times inside a group block;
- fp16 (dynamic loss scaling), torch-autocast grad scaler, ZenFlow, DeepCompile, MiCS, sparse
  gradients: not implemented or not testable here.
"""

from __future__ import annotations

from typing import Any

from balancer.errors import BalancerError

__all__ = ["DeepSpeedUnsupportedError", "check_supported"]

_WRAPPERS = {
    "DeepSpeedZeroOptimizer": "ZeRO-1/2",
    "DeepSpeedZeroOptimizer_Stage3": "ZeRO-3",
    "BF16_Optimizer": "ZeRO-1 bf16 with fp32 gradient accumulation",
    "FP16_UnfusedOptimizer": "stage 0 bf16",
    "FP16_Optimizer": "stage 0 bf16",
}


class DeepSpeedUnsupportedError(BalancerError, NotImplementedError):
    """The DeepSpeed engine uses a feature the Balancer cannot balance exactly; nothing was changed."""


def _call(engine: Any, name: str, default: Any = None) -> Any:
    attr = getattr(engine, name, None)
    return attr() if callable(attr) else default if attr is None else attr


def _ranks(group: Any) -> list[int]:
    import torch.distributed as dist

    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


def _problems(engine: Any) -> list[str]:
    found: list[str] = []

    def refuse(condition: bool, what: str) -> None:
        if condition:
            found.append(what)

    refuse(
        bool(getattr(engine, "pipeline_parallelism", False)),
        "pipeline parallelism (PipelineModule); fix: train without a pipeline, data parallel only",
    )
    refuse(
        int(getattr(engine, "mp_world_size", 1) or 1) > 1 or int(_call(engine, "autotp_size", 0) or 0) > 1,
        f"tensor/model parallelism (model-parallel world size {getattr(engine, 'mp_world_size', '?')}, "
        f"autotp_size {_call(engine, 'autotp_size', 0)}); fix: remove the mpu / tensor_parallel section",
    )
    refuse(
        int(getattr(engine, "sequence_parallel_size", 1) or 1) > 1,
        f"sequence parallelism (size {getattr(engine, 'sequence_parallel_size', '?')}); fix: set it to 1",
    )
    refuse(bool(getattr(engine, "has_moe_layers", False)), "MoE layers (expert parallelism); fix: a dense model")
    offload_opt = _call(engine, "zero_offload_optimizer")
    offload_param = _call(engine, "zero_offload_param")
    refuse(
        offload_opt is not None and str(getattr(offload_opt, "device", "none")).split(".")[-1].lower() != "none",
        f"zero_optimization.offload_optimizer (device {getattr(offload_opt, 'device', None)}); fix: remove it "
        "(keep optimizer states on the training device)",
    )
    refuse(
        offload_param is not None and str(getattr(offload_param, "device", "none")).split(".")[-1].lower() != "none",
        f"zero_optimization.offload_param (device {getattr(offload_param, 'device', None)}); fix: remove it",
    )
    gas = _call(engine, "gradient_accumulation_steps", 1)
    refuse(
        gas != 1,
        f"gradient_accumulation_steps = {gas}; fix: set it to 1 (every group's backward is a reduction "
        "boundary; to accumulate, call engine.backward several times inside the group block before opt.step())",
    )
    refuse(
        _call(engine, "managed_gradient_accumulation", True) is False,
        "managed_gradient_accumulation = false; fix: remove it (the default, true, is needed to mark each "
        "group's backward as a boundary)",
    )
    refuse(bool(_call(engine, "fp16_enabled", False)), "fp16 (dynamic loss scaling); fix: use bf16 or fp32")
    refuse(
        getattr(engine, "torch_autocast_z0_gradscaler", None) is not None,
        "torch_autocast with a grad scaler; fix: use bf16 without torch_autocast, or fp32",
    )
    refuse(bool(getattr(engine, "zenflow", False)), "ZenFlow; fix: remove the zenflow section")
    refuse(bool(_call(engine, "is_deepcompile_enabled", False)), "DeepCompile; fix: disable compile.deepcompile")
    refuse(bool(_call(engine, "sparse_gradients_enabled", False)), "sparse_gradients; fix: set it to false")
    return found


def check_supported(engine: Any) -> None:
    """Raises :class:`DeepSpeedUnsupportedError` listing every unsupported setting of ``engine``."""
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None or type(optimizer).__name__ == "DummyOptim":
        raise DeepSpeedUnsupportedError(
            "The DeepSpeed engine has no optimizer (found "
            f"`{type(optimizer).__name__}`). Pass one to deepspeed.initialize(optimizer=...) or define an "
            "'optimizer' section in the config, then build the Balancer from the engine."
        )
    problems = _problems(engine)
    stage = int(_call(engine, "zero_optimization_stage", 0))
    name = type(optimizer).__name__
    if not problems and stage > 0 and name not in _WRAPPERS:
        problems.append(f"ZeRO stage {stage} with the optimizer wrapper `{name}` (MiCS or another variant)")
    if stage == 3:
        ranks = _ranks(getattr(optimizer, "dp_process_group", None))
        odd = [p for grp in optimizer.fp16_groups for p in grp if _ranks(getattr(p, "ds_process_group", None)) != ranks]
        if odd:
            problems.append(f"ZeRO-3 with {len(odd)} parameter(s) partitioned over another process group (MiCS?)")
    if stage == 0:
        dtypes = {p.dtype for p in engine.module.parameters() if p.requires_grad}
        if len(dtypes) > 1:
            problems.append(f"stage 0 with trained parameters of several dtypes {sorted(map(str, dtypes))}")
    if problems:
        raise DeepSpeedUnsupportedError(
            "The Balancer cannot balance this DeepSpeed engine exactly; nothing was changed. Unsupported: "
            + "; ".join(problems)
            + ". Supported: ZeRO 0-3, pure data parallelism, fp32 or bf16, no offload, gradient_accumulation_steps 1."
        )
