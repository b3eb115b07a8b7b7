"""Step time of the balanced TRL trainers over the plain ones, on the same batches.

Rows (2 CPU threads, a Llama built from a config: hidden 256, 4 layers, the character tokenizer of
the tests, float32):

* ``DPOTrainer`` vs ``BalancedDPOTrainer`` with a tap-only rule (``balanced_dpo`` ``rule="prob"``:
  one backward pass through the taps) and with a group rule (``rule="norm"``: chosen and rejected
  captured as groups by ``opt.backward_rows``);
* ``GRPOTrainer`` vs ``BalancedGRPOTrainer`` with ``task_norm`` on k = 2 and 4 tasks (one group
  per task, split by ``opt.backward_rows``); the GRPO step includes generation, which is the same
  for both.

Each trainer runs ``steps`` optimizer steps from the same seed (same data order, same batches and,
for GRPO, the same generations); a step is timed from ``on_step_begin`` to ``on_step_end``, and the
time inside ``training_step`` (forward, loss, backward) is timed too, which is where the balanced
trainers differ. The variants of a row run in turn, ``rounds`` times, and the median step over all
rounds after ``warmup`` steps is kept, which spreads machine drift over all of them.

Target: the tap-only rule at most 1.05x. For the group rules the ratio is reported with where the
time goes: the extra backward passes of ``backward_rows`` (one below the log-probs per group, where
TRL takes one in all), the baseline for a later one-backward capture of transformer layers.
PASS/FAIL is printed against the target; the script exits 0 either way. Run::

    python benchmarks/trl_overhead.py            # about 4 minutes on 2 idle cores
    python benchmarks/trl_overhead.py --quick    # tiny sizes, a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.integrations.trl_fixtures import tiny_tokenizer  # noqa: E402

THREADS = 2
TAP_TARGET = 1.05


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    pairs: int  # DPO pairs per step
    completion: int  # DPO completion characters
    prompts: int  # GRPO prompts per step (each with `generations` completions)
    generations: int
    new_tokens: int
    steps: int
    warmup: int
    rounds: int


FULL = Size(256, 4, pairs=8, completion=48, prompts=8, generations=4, new_tokens=16, steps=5, warmup=1, rounds=3)
QUICK = Size(32, 2, pairs=4, completion=8, prompts=4, generations=2, new_tokens=4, steps=2, warmup=1, rounds=1)


def make_model(size: Size) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer()), hidden_size=size.hidden, intermediate_size=4 * size.hidden,
        num_hidden_layers=size.layers, num_attention_heads=8 if size.hidden >= 128 else 4, num_key_value_heads=4,
        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def letters(gen: torch.Generator, n: int) -> str:
    return "".join("abcdefghijklmnopqrstuvwxyz"[int(i)] for i in torch.randint(0, 26, (n,), generator=gen))


class StepTimer(TrainerCallback):
    """Step times (``on_step_begin`` to ``on_step_end``) and, patched in, ``training_step`` times."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.inner: list[float] = []
        self._start = 0.0

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.steps.append(time.perf_counter() - self._start)

    def wrap(self, trainer: Any) -> None:
        step = trainer.training_step

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                self.inner.append(time.perf_counter() - start)

        trainer.training_step = timed


def run(make: Callable[[Path], Any], size: Size) -> tuple[list[float], list[float]]:
    with tempfile.TemporaryDirectory() as out:
        trainer = make(Path(out))
        trainer.remove_callback(PrinterCallback)
        timer = StepTimer()
        trainer.add_callback(timer)
        timer.wrap(trainer)
        trainer.train()
    per_step = len(timer.inner) // max(1, len(timer.steps))
    inner = [sum(timer.inner[i * per_step : (i + 1) * per_step]) for i in range(len(timer.steps))]
    return timer.steps[size.warmup :], inner[size.warmup :]


def common(out: Path, size: Size, **extra: Any) -> dict[str, Any]:
    return dict(
        output_dir=str(out), max_steps=size.steps, learning_rate=1e-4, lr_scheduler_type="constant",
        logging_steps=10_000, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, seed=0,
        dataloader_num_workers=0, bf16=False, gradient_checkpointing=False, **extra,
    )  # fmt: skip


# -- DPO -------------------------------------------------------------------------------------------
def dpo_makers(size: Size) -> dict[str, Callable[[Path], Any]]:
    from trl import DPOConfig, DPOTrainer

    from balancer.integrations.trl import BalancedDPOTrainer

    gen = torch.Generator().manual_seed(1)
    n = size.pairs * (size.steps + 1)
    data = Dataset.from_dict(
        {
            "prompt": [letters(gen, 16) + "?" for _ in range(n)],
            "chosen": [" " + letters(gen, size.completion) for _ in range(n)],
            "rejected": [" " + letters(gen, size.completion) for _ in range(n)],
        }
    )

    def maker(cls: Any, **extra: Any) -> Callable[[Path], Any]:
        def make(out: Path) -> Any:
            args = DPOConfig(**common(out, size, per_device_train_batch_size=size.pairs))
            return cls(
                model=make_model(size), ref_model=make_model(size), args=args, train_dataset=data,
                processing_class=tiny_tokenizer(), **extra,
            )  # fmt: skip

        return make

    return {
        "plain": maker(DPOTrainer),
        "prob (taps)": maker(BalancedDPOTrainer, balancer=[("balanced_dpo", {"rule": "prob"})]),
        "norm (groups)": maker(BalancedDPOTrainer, balancer=["balanced_dpo"]),
    }


# -- GRPO ------------------------------------------------------------------------------------------
def grpo_makers(size: Size, k: int) -> dict[str, Callable[[Path], Any]]:
    from trl import GRPOConfig, GRPOTrainer

    from balancer.integrations.trl import BalancedGRPOTrainer

    gen = torch.Generator().manual_seed(2)
    n = size.prompts * (size.steps + 1)
    tasks = [f"t{i % k}" for i in range(n)]
    data = Dataset.from_dict({"prompt": [letters(gen, 12) + "?" for _ in range(n)], "task": tasks})

    def reward(completions: list[str], task: list[str], **_: Any) -> list[float]:
        # task t_i rewards the letter of index i, so the tasks pull the policy in different directions
        return [c.count("abcd"[int(t[1:])]) / max(1, len(c)) for c, t in zip(completions, task, strict=True)]

    def maker(balanced: bool) -> Callable[[Path], Any]:
        def make(out: Path) -> Any:
            args = GRPOConfig(
                **common(out, size, per_device_train_batch_size=size.prompts * size.generations),
                num_generations=size.generations, max_completion_length=size.new_tokens,
            )  # fmt: skip
            kwargs: dict[str, Any] = dict(
                model=make_model(size), reward_funcs=reward, args=args, train_dataset=data,
                processing_class=tiny_tokenizer(),
            )  # fmt: skip
            if not balanced:
                return GRPOTrainer(**kwargs)
            return BalancedGRPOTrainer(**kwargs, balancer=["task_norm"], group_by="task")

        return make

    return {"plain": maker(False), f"task_norm, k={k}": maker(True)}


# -- the table -------------------------------------------------------------------------------------
def measure(makers: dict[str, Callable[[Path], Any]], size: Size) -> dict[str, tuple[float, float]]:
    steps: dict[str, list[float]] = {name: [] for name in makers}
    inner: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(size.rounds):
        for name, make in makers.items():
            s, i = run(make, size)
            steps[name] += s
            inner[name] += i
    return {name: (statistics.median(steps[name]), statistics.median(inner[name])) for name in makers}


def report(title: str, times: dict[str, tuple[float, float]], targets: dict[str, float]) -> None:
    plain_step, plain_inner = times["plain"]
    print(f"\n{title}")
    print(f"{'variant':<18} {'step ms':>9} {'ratio':>7} {'fwd+bwd ms':>11} {'ratio':>7}  target")
    for name, (step, inner) in times.items():
        verdict = ""
        if name in targets:
            verdict = f"<= {targets[name]:.2f}x {'PASS' if step / plain_step <= targets[name] else 'FAIL'}"
        elif name != "plain":
            extra = inner - plain_inner
            verdict = f"report: +{1e3 * extra:.0f} ms in training_step ({extra / max(step - plain_step, 1e-9):.0%})"
        print(
            f"{name:<18} {1e3 * step:>9.1f} {step / plain_step:>6.3f}x {1e3 * inner:>11.1f} "
            f"{inner / plain_inner:>6.3f}x  {verdict}"
        )


def main(argv: list[str] | None = None) -> dict[str, dict[str, tuple[float, float]]]:
    """Prints the tables; returns, per table, each variant's median (step, training_step) seconds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke run")
    parser.add_argument("--skip-grpo", action="store_true", help="the DPO rows only")
    options = parser.parse_args(argv)
    size = QUICK if options.quick else FULL
    torch.set_num_threads(THREADS)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    print(f"{THREADS} threads, Llama hidden {size.hidden}, {size.layers} layers, float32; median of steps after warmup")
    tables = {"DPO": measure(dpo_makers(size), size)}
    report(
        f"DPO: {size.pairs} pairs per step, completions of {size.completion} tokens",
        tables["DPO"],
        {"prob (taps)": TAP_TARGET},
    )
    if not options.skip_grpo:
        for k in (2, 4):
            tables[f"GRPO k={k}"] = measure(grpo_makers(size, k), size)
            title = f"GRPO: {size.prompts} prompts x {size.generations} completions of <= {size.new_tokens} tokens"
            report(f"{title}, {k} tasks", tables[f"GRPO k={k}"], {})
    return tables


if __name__ == "__main__":
    main()
