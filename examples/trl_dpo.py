"""Balanced DPO inside TRL: ``BalancedDPOTrainer`` on a tiny Llama, plain DPO against both rules.

The pairs teach a preference the random model does not have: after a prompt of letters, the
chosen completion is digits and the rejected one letters (lengths vary). Three runs from the same
seed, data order and AdamW: no plugin (TRL's DPO update, with the chosen and rejected gradients
measured), ``balanced_dpo`` ``rule="norm"`` (the two groups brought to their mean norm) and
``rule="prob"`` (the chosen side rescaled per pair at the sequence log-probs, one backward pass).

Printed per run: the rejected/chosen gradient-norm ratio (first and last logged steps), the change
of the mean chosen and rejected log-probs from the first step, the reward margin and accuracy.
Nothing is downloaded: the model is built from a config, the tokenizer in code. About a minute on
2 cores::

    python examples/trl_dpo.py            # --steps N
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from typing import Any

import torch
import transformers
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig

from balancer.integrations.trl import BalancedDPOTrainer

ALPHABET = list("0123456789abcdefghijklmnopqrstuvwxyz? ")


def tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, plus pad / bos / eos / unk."""
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", *ALPHABET])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def model(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def pairs(n: int = 128) -> Dataset:
    g = torch.Generator().manual_seed(0)

    def draw(chars: str, length: int) -> str:
        return "".join(chars[int(i)] for i in torch.randint(0, len(chars), (length,), generator=g))

    letters, digits = "abcdefghijklmnopqrstuvwxyz", "0123456789"
    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(n):
        rows["prompt"].append(draw(letters, 4) + "?")
        rows["chosen"].append(" " + draw(digits, 3 + i % 5))
        rows["rejected"].append(" " + draw(letters, 7 - i % 5))
    return Dataset.from_dict(rows)


def train(balancer: Any, steps: int) -> list[dict[str, float]]:
    tok = tokenizer()
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out, max_steps=steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
            learning_rate=3e-4, beta=0.1, max_grad_norm=1.0, logging_steps=1, report_to=[], use_cpu=True,
            seed=0, save_strategy="no", disable_tqdm=True, bf16=False, gradient_checkpointing=False,
        )  # fmt: skip
        trainer = BalancedDPOTrainer(
            model=model(len(tok)), ref_model=model(len(tok)), args=args, train_dataset=pairs(),
            processing_class=tok, balancer=balancer,
        )  # fmt: skip
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def summary(name: str, logs: list[dict[str, float]]) -> str:
    first, last = logs[0], logs[-1]

    def ratio(entry: dict[str, float]) -> str:
        if "balancer/norm/chosen" not in entry:
            return "   -  "  # rule="prob" alone takes one backward pass: the groups are not measured
        return f"{entry['balancer/norm/rejected'] / entry['balancer/norm/chosen']:6.2f}"

    return (
        f"{name:<14} {ratio(first)} -> {ratio(last)}   {last['logps/chosen'] - first['logps/chosen']:+8.2f}  "
        f"{last['logps/rejected'] - first['logps/rejected']:+8.2f}   {last['rewards/margins']:7.3f}  "
        f"{last['rewards/accuracies']:5.2f}"
    )


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    """Trains the three runs, prints the table, returns each run's training logs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    steps = parser.parse_args(argv).steps
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(2)
    runs = {
        "DPO": None,
        "norm": ["balanced_dpo"],
        "prob": [("balanced_dpo", {"rule": "prob"})],
    }
    print(f"{steps} steps of 16 pairs; norm ratio = rejected/chosen gradient norm (first -> last step)")
    print(f"{'run':<14} {'norm ratio':>16}   {'Δlogp_w':>8}  {'Δlogp_l':>8}   {'margin':>7}  {'acc':>5}")
    logs = {}
    for name, balancer in runs.items():
        logs[name] = train(balancer, steps)
        print(summary(name, logs[name]), flush=True)
    return logs


if __name__ == "__main__":
    main()
