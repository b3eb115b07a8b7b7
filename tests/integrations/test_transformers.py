"""BalancedTrainer against transformers.Trainer on a tiny float32 Llama (CPU, nothing downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from balancer import Balancer, unwrap  # noqa: E402
from balancer.errors import CaptureError  # noqa: E402
from balancer.integrations._hf_sampler import StratifiedGroupSampler  # noqa: E402
from balancer.integrations.transformers import BalancedTrainer, GroupingError, TrainerSetupError  # noqa: E402
from tests.integrations.trl_fixtures import assert_resumed_run_identical, common_args, max_relative_difference  # noqa: E402

TASKS = ("math", "code", "chat")


@pytest.fixture(autouse=True)
def _quiet_transformers() -> None:
    transformers.logging.set_verbosity_error()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).float()


def dataset(n: int = 24, task_values: Any = TASKS) -> Any:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (n, 8), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100  # prompt tokens
    labels[::3, 5:] = -100  # groups with different numbers of label tokens
    tasks = [task_values[i % len(task_values)] for i in range(n)]
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist(), "task": tasks})


def training_args(out: Path, **overrides: Any) -> TrainingArguments:
    return TrainingArguments(**common_args(out, **overrides))


def train_pair(tmp_path: Path, data: Any = None, trainer_setup: Any = None, **overrides: Any) -> tuple[Any, Any]:
    """The same run with Trainer and with BalancedTrainer (no plugin, grouped by task)."""
    plain = Trainer(
        model=tiny_llama(), args=training_args(tmp_path / "plain", **overrides), train_dataset=data or dataset()
    )
    balanced = BalancedTrainer(
        model=tiny_llama(),
        args=training_args(tmp_path / "balanced", **overrides),
        train_dataset=data or dataset(),
        balancer=[],
        group_by="task",
    )
    for trainer in (plain, balanced):
        if trainer_setup is not None:
            trainer_setup(trainer)
        trainer.train()
    return plain, balanced


def logged(trainer: Any, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def test_no_plugin_equals_trainer_with_accumulation_and_clipping(tmp_path: Path) -> None:
    # Trainer's SGD (args.optim): the parameters move linearly with the gradient, so this bounds the gradient error.
    plain, balanced = train_pair(tmp_path, optim="sgd", max_steps=4)
    assert max_relative_difference(plain.model, balanced.model) <= 1e-6
    assert logged(balanced, "grad_norm") == pytest.approx(logged(plain, "grad_norm"), rel=1e-6)
    assert logged(balanced, "loss") == pytest.approx(logged(plain, "loss"), rel=1e-6)
    assert all(0.5 < n for n in logged(plain, "grad_norm"))  # clipping was active in every step
    assert isinstance(unwrap(balanced.optimizer), Balancer)


def test_no_plugin_equals_trainer_adamw(tmp_path: Path) -> None:
    # Trainer's AdamW with its weight-decay groups and the linear schedule. Adam divides by sqrt(v), so
    # coordinates whose gradient is ~0 turn rounding-level differences into lr-sized steps: looser bound.
    plain, balanced = train_pair(tmp_path, weight_decay=0.1)
    assert len(unwrap(balanced.optimizer).param_groups) == 2  # decay / no decay
    assert max_relative_difference(plain.model, balanced.model) <= 1e-4
    assert logged(balanced, "grad_norm") == pytest.approx(logged(plain, "grad_norm"), rel=1e-6)


def test_single_group_is_bit_identical(tmp_path: Path) -> None:
    one_task = dataset(task_values=("math",))
    plain, balanced = train_pair(tmp_path, data=one_task)
    for p, q in zip(plain.model.parameters(), balanced.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_mean_loss_groups_are_weighted_by_label_tokens(tmp_path: Path) -> None:
    # A model whose loss is a mean over its batch (no num_items_in_batch): each group's loss is
    # weighted by its share of the label tokens, so the sum is still Trainer's batch loss.
    def mean_reduced(trainer: Any) -> None:
        trainer.model_accepts_loss_kwargs = False

    plain, balanced = train_pair(tmp_path, trainer_setup=mean_reduced, optim="sgd")
    assert max_relative_difference(plain.model, balanced.model) <= 1e-6
    assert logged(balanced, "loss") == pytest.approx(logged(plain, "loss"), rel=1e-6)


def test_logs_groups_weights_and_plugin_metrics(tmp_path: Path) -> None:
    int_tasks = dataset(task_values=(0, 1, 2))
    trainer = BalancedTrainer(
        model=tiny_llama(),
        args=training_args(tmp_path, max_steps=2),
        train_dataset=int_tasks,
        balancer={"plugins": [{"name": "task_norm", "options": {"alpha": 1.0}}]},
        group_by="task",
    )
    trainer.train()
    log = trainer.state.log_history[0]
    opt = trainer.balancer
    assert opt.last_stats is not None and set(opt.last_stats.names) == {"0", "1", "2"}
    for name in ("0", "1", "2"):
        assert f"balancer/norm/{name}" in log and f"balancer/weight/{name}" in log
    weighted = [log[f"balancer/weight/{n}"] * log[f"balancer/norm/{n}"] for n in ("0", "1", "2")]
    assert weighted == pytest.approx([weighted[0]] * 3, rel=1e-4)  # task_norm equalises the weighted norms
    assert {f"balancer/task_norm/{k}" for k in opt.plugin_metrics()["task_norm"]} <= set(log)


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    def run(out: Path, resume: str | None = None) -> Any:
        trainer = BalancedTrainer(
            model=tiny_llama(),
            args=training_args(out, max_steps=4, save_strategy="steps", save_steps=2, logging_steps=2),
            train_dataset=dataset(),
            balancer=[("task_norm", {"beta": 0.5})],  # an EMA: the plugin state matters after resuming
            group_by="task",
            stratify=True,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    assert_resumed_run_identical(full, run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2")))


def test_stratified_sampler_puts_every_group_in_every_step(tmp_path: Path) -> None:
    names = ["a"] * 50 + ["b"] * 10 + ["c"] * 3
    sampler = StratifiedGroupSampler(names, step_size=8, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(len(names)))
    assert [set(names[i] for i in order[s : s + 8]) >= {"a", "b"} for s in range(0, 56, 8)] == [True] * 7
    assert {names[i] for i in order[:24]} == {"a", "b", "c"} and all(
        {names[i] for i in order[s : s + 8]} == {"a", "b", "c"} for s in (0, 8, 16)
    )
    assert list(sampler) == order  # the order depends only on the seed and the epoch
    sampler.set_epoch(1)
    assert list(sampler) != order

    seen: list[set[str]] = []

    class Record(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            seen.append(set(trainer.balancer.last_stats.names))

    skewed = dataset(n=32, task_values=("math",) * 6 + ("code", "chat"))
    trainer = BalancedTrainer(
        model=tiny_llama(),
        args=training_args(tmp_path, per_device_train_batch_size=2, max_steps=4),
        train_dataset=skewed,
        balancer=[],
        group_by="task",
        stratify=True,
        callbacks=[Record()],
    )
    trainer.train()
    assert seen == [set(TASKS)] * 4


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft asks transformers
def test_lora_with_task_norm(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = BalancedTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=2, activation_checkpointing=True),
        train_dataset=dataset(),
        balancer=["task_norm"],
        group_by="task",
    )
    trainer.train()
    assert set(trainer.balancer.last_stats.names) == set(TASKS)
    trained = dict(model.named_parameters())
    assert any(not torch.equal(trained[n], p) for n, p in before.items() if "lora_B" in n)
    assert "balancer/weight/math" in trainer.state.log_history[0]


def test_refuses_what_would_bypass_the_balancer(tmp_path: Path) -> None:
    model = tiny_llama()
    plain_opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(TrainerSetupError, match="is not a Balancer"):
        BalancedTrainer(
            model=model,
            args=training_args(tmp_path),
            train_dataset=dataset(),
            optimizers=(plain_opt, None),
            group_by="task",
        )
    wrapped = Balancer(torch.optim.AdamW(model.parameters()))
    with pytest.raises(TrainerSetupError, match="Both optimizers"):
        BalancedTrainer(
            model=model,
            args=training_args(tmp_path),
            optimizers=(wrapped, None),
            balancer=["task_norm"],
            group_by="task",
        )
    with pytest.raises(TrainerSetupError, match="group_by"):
        BalancedTrainer(model=model, args=training_args(tmp_path), train_dataset=dataset(), balancer=[])
    with pytest.raises(TrainerSetupError, match="max_grad_norm"):
        BalancedTrainer(
            model=model, args=training_args(tmp_path), balancer={"plugins": [], "max_grad_norm": 1.0}, group_by="task"
        )
    missing = BalancedTrainer(
        model=model, args=training_args(tmp_path), train_dataset=dataset(), balancer=[], group_by="domain"
    )
    with pytest.raises(TrainerSetupError, match="'domain' is not a column"):
        missing.train()
    floats = dataset(task_values=(0.5, 1.5))
    bad = BalancedTrainer(model=model, args=training_args(tmp_path), train_dataset=floats, balancer=[], group_by="task")
    with pytest.raises(GroupingError, match="must be strings or integers"):
        bad.train()


def test_user_balancer_in_optimizers_is_used(tmp_path: Path) -> None:
    model = tiny_llama()
    opt = Balancer(torch.optim.SGD(model.parameters(), lr=1e-2), plugins=["task_norm"])
    trainer = BalancedTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=1),
        train_dataset=dataset(),
        optimizers=(opt, None),
        group_by="task",
    )
    trainer.train()
    assert unwrap(trainer.optimizer) is opt and opt.last_stats is not None


def test_unwrap() -> None:
    accelerate = pytest.importorskip("accelerate")
    inner = Balancer(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1))
    wrapped = accelerate.optimizer.AcceleratedOptimizer(inner, device_placement=False)
    assert unwrap(wrapped) is inner and unwrap(inner) is inner

    class LightningLike:
        def __init__(self, optimizer: Any) -> None:
            self._optimizer = optimizer

    assert unwrap(LightningLike(wrapped)) is inner
    with pytest.raises(TypeError, match="no Balancer inside .*SGD"):
        unwrap(accelerate.optimizer.AcceleratedOptimizer(inner.inner, device_placement=False))


def test_capture_error_names_enable_input_require_grads() -> None:
    layer = torch.nn.Linear(4, 4)
    opt = Balancer(torch.optim.SGD(layer.parameters(), lr=0.1))
    embedded = torch.randn(2, 3, 4).requires_grad_(True)  # what enable_input_require_grads() leaves
    with pytest.raises(CaptureError, match="enable_input_require_grads"):
        opt.backward({"a": layer(embedded).sum()})
