"""``BalancedTrainer`` with ``TrainingArguments(deepspeed=...)``: ZeRO through accelerate's DeepSpeed plugin.

How ``Trainer`` drives DeepSpeed (transformers 5): ``_prepare_for_training`` runs ``deepspeed_init``,
which asks ``create_optimizer()`` for the torch optimizer (unless the config has an ``optimizer``
section), then ``accelerator.prepare(model, optimizer)`` builds the engine; ``self.model_wrapped``
(and ``self.deepspeed``) become the engine, ``self.optimizer`` accelerate's wrapper of the engine's
optimizer. ``accelerator.backward`` runs ``engine.backward`` and ``engine.step`` together, and
DeepSpeed clips with its ``gradient_clipping`` (Trainer fills it from ``max_grad_norm``).

``BalancedTrainer`` therefore hands DeepSpeed the plain optimizer, and once the engine exists
builds the Balancer on it with :func:`~balancer.integrations._hf_deepspeed.wrap_deepspeed_engine`
(the backend and statistics of :mod:`balancer.integrations.deepspeed`; the ``engine.step()`` inside
``accelerator.backward`` is deferred to the Balancer's step) and makes it the optimizer ``Trainer``
steps. DeepSpeed's clip then acts on the balanced update; its norm is known only once the step has
combined the groups, so the logged ``grad_norm`` is taken from ``last_stats`` after the step.

:func:`check_trainer_deepspeed` refuses, when the trainer is built, the settings the DeepSpeed
backend cannot balance exactly, so that no training starts with them.
"""

from __future__ import annotations

import importlib
from typing import Any

from balancer.optimizer import Balancer

from ._deepspeed_checks import DeepSpeedUnsupportedError
from ._hf_deepspeed import wrap_deepspeed_engine
from ._hf_groups import TrainerSetupError

__all__ = ["check_trainer_deepspeed", "engine_balancer", "load_checkpoint_after_prepare"]

_OFFLOAD_SECTIONS = ("offload_optimizer", "offload_param")


def _ds_config(trainer: Any) -> dict[str, Any]:
    hf_config = getattr(trainer.args, "hf_deepspeed_config", None)
    if hf_config is None:
        hf_config = trainer.accelerator.state.deepspeed_plugin.hf_ds_config
    return dict(hf_config.config)


def _as_int(value: Any, default: int) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def _problems(trainer: Any, config: dict[str, Any]) -> list[str]:
    args = trainer.args
    found: list[str] = []
    gas = args.gradient_accumulation_steps
    ds_gas = _as_int(config.get("gradient_accumulation_steps"), gas)
    if gas != 1 or ds_gas != 1:
        found.append(
            f"gradient_accumulation_steps = {gas if gas != 1 else ds_gas} (TrainingArguments / DeepSpeed config); "
            "fix: set it to 1 and raise per_device_train_batch_size (every group's backward must be a DeepSpeed "
            "reduction boundary)"
        )
    zero = config.get("zero_optimization") or {}
    for section in _OFFLOAD_SECTIONS:
        device = str((zero.get(section) or {}).get("device", "none")).lower()
        if device not in ("none", "auto"):
            found.append(f"zero_optimization.{section} (device {device}); fix: remove it")
    if config.get("pipeline") or _is_pipeline_module(trainer.model):
        found.append(
            "pipeline parallelism (a PipelineModule model or a 'pipeline' config section); fix: data parallel only"
        )
    tp = _as_int((config.get("tensor_parallel") or {}).get("autotp_size"), 1)
    if tp > 1:
        found.append(f"tensor_parallel.autotp_size = {tp}; fix: remove the tensor_parallel section")
    sp = _as_int(config.get("sequence_parallel_size"), 1)
    if sp > 1:
        found.append(f"sequence_parallel_size = {sp}; fix: set it to 1")
    if args.fp16 or (config.get("fp16") or {}).get("enabled") is True:
        found.append("fp16 (dynamic loss scaling); fix: bf16=True or float32")
    return found


def _is_pipeline_module(model: Any) -> bool:
    try:
        pipe = importlib.import_module("deepspeed.pipe")
    except ImportError:  # pragma: no cover - deepspeed= needs deepspeed installed
        return False
    return isinstance(model, pipe.PipelineModule)


def check_trainer_deepspeed(trainer: Any, optimizer_given: bool) -> None:
    """Raises before any training when the trainer's DeepSpeed setup cannot be balanced exactly.

    The full check (:func:`balancer.integrations._deepspeed_checks.check_supported`) runs again on
    the engine when ``train()`` builds it; this one reads the config and arguments only.
    """
    if optimizer_given:
        raise TrainerSetupError(
            "optimizers=(Balancer, ...) with deepspeed=: Trainer's DeepSpeed setup creates its own optimizer and "
            "would silently replace the Balancer given. Leave optimizers out and pass balancer=[...]; choose the "
            "optimizer with TrainingArguments.optim or the DeepSpeed config's 'optimizer' section."
        )
    problems = _problems(trainer, _ds_config(trainer))
    if problems:
        raise DeepSpeedUnsupportedError(
            "BalancedTrainer cannot balance this DeepSpeed setup exactly: "
            + "; ".join(problems)
            + ". Supported: ZeRO 0-3, data parallel, float32 or bf16, no offload, gradient_accumulation_steps 1."
        )


def engine_balancer(trainer: Any, plugins: list[Any], kwargs: dict[str, Any]) -> Balancer:
    """The Balancer on the engine ``accelerator.prepare`` built (after ``_prepare_for_training``)."""
    wrapped = getattr(trainer.accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is None:
        raise TrainerSetupError("deepspeed= is set but accelerate built no DeepSpeed engine; nothing to balance.")
    return wrap_deepspeed_engine(wrapped.engine, plugins, **kwargs)


def load_checkpoint_after_prepare(trainer: Any, checkpoint: str) -> None:
    """What ``Trainer._prepare_for_training`` loads when resuming under DeepSpeed, run once the
    Balancer is on the engine, so that ``engine.load_checkpoint`` restores its section too."""
    from transformers.integrations.deepspeed import deepspeed_load_checkpoint
    from transformers.trainer import _is_peft_model

    deepspeed_load_checkpoint(trainer.model_wrapped, checkpoint, load_module_strict=not _is_peft_model(trainer.model))
    trainer._load_optimizer_and_scheduler(checkpoint)
    trainer._load_scaler(checkpoint)
