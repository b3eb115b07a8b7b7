"""Tiny models, a tokenizer built in code, in-memory datasets and comparisons for the Hugging Face Trainer and TRL
trainer tests (nothing downloaded; TRL itself is not imported here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Single characters: digits, lower-case letters, a few signs; every string below tokenises to known ids.
_ALPHABET = list("0123456789abcdefghijklmnopqrstuvwxyz+-=?: ")
_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one id per character of ``_ALPHABET``, plus pad/bos/eos/unk."""
    vocab = {tok: i for i, tok in enumerate(_SPECIAL + _ALPHABET)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    return tokenizer


def tiny_llama(seed: int = 0, vocab_size: int | None = None) -> LlamaForCausalLM:
    """A 2-layer float32 Llama with random weights (seeded), sized for the tiny tokenizer."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size or len(_SPECIAL) + len(_ALPHABET),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).float()


def preference_dataset(n: int = 16, seed: int = 1) -> Any:
    """Prompt / chosen / rejected strings of different lengths (so sums and token means differ)."""
    g = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def word(length: int) -> str:
        return "".join(letters[int(i)] for i in torch.randint(0, 26, (length,), generator=g))

    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(n):
        rows["prompt"].append(word(3 + i % 3) + "?")
        rows["chosen"].append(" " + word(2 + i % 4))
        rows["rejected"].append(" " + word(5 - i % 3))
    return datasets.Dataset.from_dict(rows)


def common_args(out: Path, **overrides: Any) -> dict[str, Any]:
    """TrainingArguments fields every TRL test shares: CPU, seeded, quiet, no checkpoints unless asked."""
    base: dict[str, Any] = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-2,
        max_grad_norm=0.5,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        save_strategy="no",
        disable_tqdm=True,
    )
    base.update(overrides)
    return base


def assert_resumed_run_identical(full: Any, resumed: Any) -> None:
    """A run resumed from a checkpoint ends with the parameters and Balancer state of the uninterrupted one, bit
    for bit."""
    import json

    for p, q in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)
    a, b = full.balancer.state_dict()["balancer"], resumed.balancer.state_dict()["balancer"]
    assert json.dumps(a, default=str) == json.dumps(b, default=str)


def max_relative_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest parameter difference, relative to each parameter's largest entry."""
    return max(
        ((p - q).abs().max() / p.abs().max()).item() for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


# -- DeepSpeed on 2 CPU ranks (the scripts the *_deepspeed tests launch) ---------------------------
def deepspeed_config(stage: int) -> dict[str, Any]:
    """ZeRO ``stage`` with the sizes and clipping taken from the TrainingArguments (``"auto"``), quiet.
    Resets accelerate's process-wide state, so that a script can build one trainer after another."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": stage},
    }


def save_engine_parameters(trainer: Any, path: Path) -> None:
    """The full parameters of a trained DeepSpeed trainer's model (gathered under ZeRO-3), as a list."""
    import deepspeed

    engine = trainer.model_wrapped
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        torch.save([p.detach().clone() for p in params], path)


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest difference of two parameter lists, relative to each of ``a``'s largest entry."""
    return max(float((p - q).abs().max() / p.abs().max()) for p, q in zip(a, b, strict=True))


def launch_reports(launch: Any, script: str, *args: str, timeout: float = 600) -> tuple[Path, list[dict[str, Any]]]:
    """Runs ``script`` on 2 ranks (a module-scoped ``launch_once``) and reads the ``report<rank>.json`` each
    rank wrote. The first DeepSpeed launch on a machine also compiles its shm op (about 70 s on 2 cores)."""
    import json

    launch(script, *args, timeout=timeout)
    path = Path(launch.tmp_path)
    return path, [json.loads((path / f"report{rank}.json").read_text()) for rank in (0, 1)]


def load_parameters(path: Path) -> list[torch.Tensor]:
    """A parameter list saved by :func:`save_engine_parameters`."""
    return torch.load(path, weights_only=True)
