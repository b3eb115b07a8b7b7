"""Multi-task fine-tuning with ``transformers.Trainer`` and ``task_norm`` (``BalancedTrainer``).

A tiny Llama (built from a config, nothing downloaded; character-level vocabulary) learns three
synthetic text tasks at once, every answer 4 characters long: ``copy`` (repeat 4 letters: easy),
``sort`` (sort 4 letters) and ``mul`` (the 4-digit product of two 2-digit numbers: hard). Their
gradients differ in size by nature, not by importance: once ``copy`` is learned its gradient
all but vanishes, while ``sort`` and ``mul`` keep large ones (Wu et al., *Imbalanced Gradients in
RL Post-Training of Multi-Task LLMs*). The same data, model and seed are trained twice through
``BalancedTrainer(group_by="task", stratify=True)``: once with no plugin (the update is exactly the
plain sum of the task losses' gradients) and once with ``task_norm`` (equal per-task gradient
norms). Each batch is split by task, one backward per task; ``stratify`` puts every task in every step.

Run (about 50 s on 2 CPU cores; ``--quick``: a few steps, a smoke run)::

    python examples/trainer_multitask.py --out trainer-multitask
    balancer report trainer-multitask/metrics.jsonl -o trainer-multitask/report.png

It prints each task's eval loss for both runs and writes ``metrics.jsonl`` (per-task gradient
norms and weights at every step, both runs, via :class:`balancer.MetricsLogger`); the per-step
``balancer/...`` keys also reach the Trainer's logs, and TensorBoard when it is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments, set_seed

import balancer
from balancer import MetricsLogger
from balancer.integrations.transformers import BalancedTrainer

TASKS = ("copy", "sort", "mul")
LETTERS = "abcdefghijklmnop"
VOCAB = {c: i for i, c in enumerate(">0123456789" + LETTERS + "CSM")}  # C, S, M: the task tags
PROMPT = 6  # tag, 4 prompt characters, ">": the loss is on the 4 answer characters only


def example(task: str, rng: random.Random) -> dict[str, list[int] | str]:
    """One example, e.g. ``Sdbca>abcd`` or ``M1207>0084``; labels are -100 on the prompt."""
    if task == "mul":
        x, y = rng.randrange(100), rng.randrange(100)
        prompt, answer = f"{x:02d}{y:02d}", f"{x * y:04d}"
    else:
        prompt = "".join(rng.choices(LETTERS, k=4))
        answer = prompt if task == "copy" else "".join(sorted(prompt))
    ids = [VOCAB[task[0].upper()]] + [VOCAB[c] for c in f"{prompt}>{answer}"]
    return {"input_ids": ids, "labels": [-100] * PROMPT + ids[PROMPT:], "task": task}


def datasets(per_task: int, eval_per_task: int) -> tuple[Dataset, dict[str, Dataset]]:
    rng = random.Random(0)
    train = Dataset.from_list([example(task, rng) for _ in range(per_task) for task in TASKS])
    evals = {
        t: Dataset.from_list([example(t, rng) for _ in range(eval_per_task)]).remove_columns("task") for t in TASKS
    }
    return train, evals


class LogBalancer(TrainerCallback):
    """Writes the Balancer's per-group norms and weights of every optimizer step to a metrics log."""

    def __init__(self, log: MetricsLogger) -> None:
        self.log = log

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.log.log(balancer.unwrap(optimizer), step=state.global_step)


def train(run: str, plugins: list[str], args: argparse.Namespace, data: tuple[Dataset, dict[str, Dataset]]) -> dict:
    set_seed(0)
    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16,
    )  # fmt: skip
    training = TrainingArguments(
        output_dir=str(args.out / run),
        max_steps=args.steps,
        per_device_train_batch_size=48,  # 16 examples per task with stratify=True
        per_device_eval_batch_size=256,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to="tensorboard" if importlib.util.find_spec("tensorboard") else "none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    with MetricsLogger(args.out / "metrics.jsonl", run=run) as log:
        trainer = BalancedTrainer(
            model=LlamaForCausalLM(config),
            args=training,
            train_dataset=data[0],
            balancer=plugins,
            group_by="task",
            stratify=True,
            callbacks=[LogBalancer(log)],
        )
        trainer.train()
    metrics = trainer.evaluate(eval_dataset=data[1])
    return {task: metrics[f"eval_{task}_loss"] for task in TASKS}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("trainer-multitask"), help="metrics.jsonl and run folders")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run (default 600)")
    parser.add_argument("--quick", action="store_true", help="4 steps per run on little data: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 4
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.jsonl").unlink(missing_ok=True)  # this invocation's two runs only
    data = datasets(per_task=64 if args.quick else 4000, eval_per_task=32 if args.quick else 500)
    started = time.perf_counter()
    losses = {run: train(run, plugins, args, data) for run, plugins in (("baseline", []), ("task_norm", ["task_norm"]))}
    print(f"\neval loss per task after {args.steps} steps (answer tokens only; lower is better)")
    print(f"{'task':<6} {'baseline':>9} {'task_norm':>9}")
    for task in TASKS:
        print(f"{task:<6} {losses['baseline'][task]:>9.4f} {losses['task_norm'][task]:>9.4f}")
    print(f"both runs: {time.perf_counter() - started:.1f} s; metrics log: {args.out / 'metrics.jsonl'}")
    return losses


if __name__ == "__main__":
    main()
