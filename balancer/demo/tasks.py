"""Synthetic tasks of ``balancer demo``: digit prompts, digit answers, verifiable rewards.

Two task sets. ``NATURE_TASKS`` (the default): every answer has 2 tokens, and the tasks differ
by their nature, which is what Wu et al. (arXiv 2510.19178) found behind the gradient imbalance:

- ``copy``: the two prompt digits in reverse order. Easy; partial credit per digit.
- ``cmp``: two comparison bits ``[a > b, b > c]`` of three digits. A 2-letter answer alphabet
  (0/1 out of the 10 digits the policy can say); partial credit per digit.
- ``mul``: ``a·b`` as two digits (``07``, ``81``). Hard (a 100-entry table) and sparse: the
  reward is 1 only if both digits are right, else 0.

``LENGTH_TASKS`` (the earlier demo, ``--setting length``): answers of different lengths, which
under a summed per-sequence loss make the gradient scale follow the answer length:

- ``count``: count up from the prompt digit, ``d+1, …, d+8`` (mod 10). 8 tokens, easy.
- ``mul1``: ``(a·b) mod 10``: 1 token, hard.
- ``max``: the largest of three digits, 1 token.

Unless a task says otherwise, the reward is the fraction of its answer tokens that are right.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["DIGITS", "LENGTH_TASKS", "NATURE_TASKS", "TASK_SETS", "Task", "separator_token", "task_token", "vocab_size"]

DIGITS = 10
"""Prompt and answer tokens are the digits 0..9; the policy's output vocabulary is the digits."""


@dataclasses.dataclass(frozen=True)
class Task:
    """A task: how to draw prompts, and the right answer to each (the reward checks it)."""

    name: str
    prompt_len: int
    answer_len: int
    draw: Callable[[int, torch.Generator], Tensor]
    """``draw(n, generator)`` -> ``[n, prompt_len]`` digit prompts."""
    solve: Callable[[Tensor], Tensor]
    """``solve(prompts)`` -> ``[n, answer_len]`` right answers."""
    all_or_nothing: bool = False
    """Reward 1 only when every answer token is right (else the fraction of right tokens)."""

    def reward(self, prompts: Tensor, responses: Tensor) -> Tensor:
        """``[n]`` rewards: the fraction of right answer tokens, or all-or-nothing."""
        right = (responses == self.solve(prompts)).to(torch.float32)
        return right.min(dim=1).values if self.all_or_nothing else right.mean(dim=1)


def _digits(length: int) -> Callable[[int, torch.Generator], Tensor]:
    def draw(n: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, DIGITS, (n, length), generator=generator)

    return draw


def _count(prompts: Tensor) -> Tensor:
    return (prompts + torch.arange(1, COUNT_LEN + 1)) % DIGITS


def _mul(prompts: Tensor) -> Tensor:
    return (prompts[:, :1] * prompts[:, 1:2]) % DIGITS


def _reverse(prompts: Tensor) -> Tensor:
    return prompts.flip(dims=[1])


def _compare(prompts: Tensor) -> Tensor:
    return (prompts[:, :-1] > prompts[:, 1:]).to(torch.long)


def _mul2(prompts: Tensor) -> Tensor:
    product = prompts[:, :1] * prompts[:, 1:2]
    return torch.cat([product // DIGITS, product % DIGITS], dim=1)


def _max(prompts: Tensor) -> Tensor:
    return prompts.max(dim=1, keepdim=True).values


COUNT_LEN = 8
LENGTH_TASKS: tuple[Task, ...] = (
    Task("count", prompt_len=1, answer_len=COUNT_LEN, draw=_digits(1), solve=_count),
    Task("mul1", prompt_len=2, answer_len=1, draw=_digits(2), solve=_mul),
    Task("max", prompt_len=3, answer_len=1, draw=_digits(3), solve=_max),
)
NATURE_TASKS: tuple[Task, ...] = (
    Task("copy", prompt_len=2, answer_len=2, draw=_digits(2), solve=_reverse),
    Task("cmp", prompt_len=3, answer_len=2, draw=_digits(3), solve=_compare),
    Task("mul", prompt_len=2, answer_len=2, draw=_digits(2), solve=_mul2, all_or_nothing=True),
)
TASK_SETS = {"nature": NATURE_TASKS, "length": LENGTH_TASKS}
"""``--setting``: the task set of each setting."""


def task_token(index: int) -> int:
    """The token that tells the policy which task a prompt belongs to (after the digits)."""
    return DIGITS + index


def separator_token(num_tasks: int) -> int:
    """The token between a prompt and its answer."""
    return DIGITS + num_tasks


def vocab_size(num_tasks: int) -> int:
    """Input vocabulary: digits, one token per task, the separator."""
    return DIGITS + num_tasks + 1
