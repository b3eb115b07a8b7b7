"""BalancedSFTTrainer against TRL's SFTTrainer on a tiny float32 Llama (CPU, nothing downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import transformers  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: E402

from balancer import Balancer, unwrap  # noqa: E402
from balancer.integrations._hf_groups import TrainerSetupError  # noqa: E402
from balancer.integrations._trl_sft import BalancedSFTTrainer  # noqa: E402
from tests.integrations.trl_fixtures import (  # noqa: E402
    assert_resumed_run_identical,
    common_args,
    max_relative_difference,
    tiny_llama,
    tiny_tokenizer,
)

TASKS = ("math", "code", "chat")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
METRICS = ("entropy", "mean_token_accuracy", "num_tokens")
# Renders user turns as they are and marks assistant turns for assistant_only_loss.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}"
    "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def _words(n: int, seed: int, lengths: Any) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return ["".join(LETTERS[int(j)] for j in torch.randint(0, 26, (lengths(i),), generator=g)) for i in range(n)]


def text_data(n: int = 24, tasks: Any = TASKS) -> Any:
    """Plain text whose length depends on the task, so groups hold different numbers of tokens."""
    return datasets.Dataset.from_dict(
        {
            "text": _words(n, 1, lambda i: 3 + (7 * i) % 11 + 4 * (i % 3)),
            "task": [tasks[i % len(tasks)] for i in range(n)],
        }
    )


def prompt_completion_data(n: int = 24) -> Any:
    prompts = [w + "?" for w in _words(n, 2, lambda i: 3 + i % 5)]
    completions = [" " + w for w in _words(n, 3, lambda i: 2 + (3 * i) % 7)]
    return datasets.Dataset.from_dict(
        {"prompt": prompts, "completion": completions, "task": [TASKS[i % 3] for i in range(n)]}
    )


def chat_data(n: int = 24) -> Any:
    questions, answers = _words(n, 4, lambda i: 2 + i % 4), _words(n, 5, lambda i: 1 + (5 * i) % 6)
    messages = [
        [{"role": "user", "content": q + "?"}, {"role": "assistant", "content": " " + a}]
        for q, a in zip(questions, answers, strict=True)
    ]
    return datasets.Dataset.from_dict({"messages": messages, "task": [TASKS[i % 3] for i in range(n)]})


def sharp_llama() -> Any:
    """The tiny Llama with a sharpened LM head: token entropies and top-1 hits vary, so metrics that
    averaged the groups instead of the tokens would show."""
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


def config(out: Path, **overrides: Any) -> SFTConfig:
    base = dict(bf16=False, activation_checkpointing=False, max_length=None, optim="sgd", max_steps=4)
    return SFTConfig(**common_args(out, **{**base, **overrides}))


def tokenizer() -> Any:
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def balanced(out: Path, data: Any, balancer: Any = (), model: Any = None, **kwargs: Any) -> BalancedSFTTrainer:
    overrides = kwargs.pop("args", {})
    return BalancedSFTTrainer(
        model=model or sharp_llama(),
        args=config(out, **overrides),
        train_dataset=data,
        processing_class=tokenizer(),
        balancer=list(balancer),
        group_by="task",
        **kwargs,
    )


def logged(trainer: Any, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def train_pair(tmp_path: Path, data: Any, setup: Any = None, **overrides: Any) -> tuple[Any, Any]:
    """The same run with SFTTrainer and with BalancedSFTTrainer (no plugin, grouped by task)."""
    plain = SFTTrainer(
        model=sharp_llama(),
        args=config(tmp_path / "plain", **overrides),
        train_dataset=data,
        processing_class=tokenizer(),
    )
    ours = balanced(tmp_path / "balanced", data, args=overrides)
    for trainer in (plain, ours):
        if setup is not None:
            setup(trainer)
        trainer.train()
    return plain, ours


def assert_same_run(plain: Any, ours: Any) -> None:
    assert max_relative_difference(plain.model, ours.model) <= 1e-6
    assert logged(ours, "grad_norm") == pytest.approx(logged(plain, "grad_norm"), rel=1e-6)
    assert logged(ours, "loss") == pytest.approx(logged(plain, "loss"), rel=1e-6)
    for key in METRICS:  # the micro-batch's metrics, not a mean over its groups
        assert logged(ours, key) == pytest.approx(logged(plain, key), rel=1e-6), key
    assert all(n > 0.5 for n in logged(plain, "grad_norm"))  # max_grad_norm=0.5 clipped every step
    assert isinstance(unwrap(ours.optimizer), Balancer)


@pytest.mark.parametrize(
    ("data", "overrides"),
    [
        pytest.param(text_data, {}, id="text"),
        pytest.param(prompt_completion_data, {}, id="prompt_completion_only_loss"),
        pytest.param(chat_data, {"assistant_only_loss": True}, id="messages_assistant_only_loss"),
        pytest.param(text_data, {"loss_type": "dft"}, id="text_dft"),
    ],
)
def test_no_plugin_equals_sft_trainer(tmp_path: Path, data: Any, overrides: dict[str, Any]) -> None:
    plain, ours = train_pair(tmp_path, data(), **overrides)
    assert_same_run(plain, ours)
    assert set(ours.balancer.last_stats.names) == set(TASKS)
    if data is prompt_completion_data:
        assert ours.completion_only_loss  # the prompt's tokens are -100 in the labels
        assert -100 in ours.train_dataset[0]["labels"]


def test_token_mean_loss_groups_are_weighted_by_label_tokens(tmp_path: Path) -> None:
    # A model that takes no loss kwargs: no num_items_in_batch, so SFTTrainer's loss is a token mean.
    def mean_reduced(trainer: Any) -> None:
        trainer.model_accepts_loss_kwargs = False

    plain, ours = train_pair(tmp_path, prompt_completion_data(), setup=mean_reduced)
    assert_same_run(plain, ours)


def test_task_norm_changes_the_update_and_logs_groups(tmp_path: Path) -> None:
    plain, _ = train_pair(tmp_path, text_data(), max_steps=2)
    ours = balanced(tmp_path / "task_norm", text_data(), ["task_norm"], args={"max_steps": 2})
    ours.train()
    assert max_relative_difference(plain.model, ours.model) > 1e-3
    log = ours.state.log_history[0]
    weighted = [log[f"balancer/weight/{t}"] * log[f"balancer/norm/{t}"] for t in TASKS]
    assert weighted == pytest.approx([weighted[0]] * 3, rel=1e-4)  # task_norm equalises the weighted norms
    assert log["num_tokens"] == logged(plain, "num_tokens")[0]  # the same micro-batches were seen


def test_stratify_puts_every_task_in_every_step(tmp_path: Path) -> None:
    seen: list[set[str]] = []

    class Record(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            seen.append(set(trainer.balancer.last_stats.names))

    skewed = text_data(n=32, tasks=("math",) * 6 + ("code", "chat"))
    trainer = balanced(tmp_path, skewed, args={"per_device_train_batch_size": 2}, stratify=True, callbacks=[Record()])
    trainer.train()
    assert seen == [set(TASKS)] * 4


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    def run(out: Path, resume: str | None = None) -> Any:
        args = {"save_strategy": "steps", "save_steps": 2, "logging_steps": 2}
        trainer = balanced(out, text_data(), [("task_norm", {"beta": 0.5})], args=args)  # an EMA: state matters
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    assert_resumed_run_identical(full, run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2")))


# TRL turns gradient checkpointing on by default; transformers deprecates the name it is enabled through.
@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft asks transformers
def test_lora_with_task_norm(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    trainer = balanced(
        tmp_path,
        text_data(),
        ["task_norm"],
        model=tiny_llama(),
        args={"max_steps": 2, "activation_checkpointing": True},
        peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert set(trainer.balancer.last_stats.names) == set(TASKS)
    trained = dict(trainer.model.named_parameters())
    assert any(not torch.equal(trained[n], p) for n, p in before.items() if "lora_B" in n)
    assert "balancer/weight/math" in trainer.state.log_history[0]


def tiny_mixtral() -> Any:
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=2,
        num_experts_per_tok=1,
        max_position_embeddings=64,
    )
    return transformers.MixtralForCausalLM(cfg).float()


def test_refuses_what_cannot_be_grouped(tmp_path: Path) -> None:
    with pytest.raises(TrainerSetupError, match="packing=True puts examples of different groups"):
        balanced(tmp_path, text_data(), args={"packing": True, "max_length": 32})
    with pytest.raises(TrainerSetupError, match="padding_free=True flattens"):
        balanced(tmp_path, text_data(), args={"padding_free": True})
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    with pytest.raises(TrainerSetupError, match="collator is padding-free"):
        balanced(tmp_path, text_data(), data_collator=flat)
    with pytest.raises(TrainerSetupError, match="router_aux_loss_coef = 0.001 .* fix: router_aux_loss_coef=0.0"):
        balanced(tmp_path, text_data(), model=tiny_mixtral())
    missing = balanced(tmp_path, text_data().rename_column("task", "domain"))
    with pytest.raises(TrainerSetupError, match="'task' is not a column"):
        missing.train()


def test_moe_without_aux_loss_is_accepted(tmp_path: Path) -> None:
    trainer = balanced(tmp_path, text_data(), model=tiny_mixtral(), args={"router_aux_loss_coef": 0.0, "max_steps": 1})
    trainer.train()
    assert set(trainer.balancer.last_stats.names) == set(TASKS)
