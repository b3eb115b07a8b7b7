"""Synthetic tasks of ``balancer demo``: digit prompts, digit answers, verifiable rewards.

Three tasks in the spirit of Wu et al.'s math mixture (an easy arithmetic task with long
answers next to harder short ones), whose gradients differ in scale for reasons of the task
itself:

- ``count``: count up from the prompt digit, ``d+1, d+2, …, d+8`` (mod 10). Long (8 tokens) and
  easy: one rule, the same at every position.
- ``mul``: ``(a·b) mod 10`` for two digits: a short, hard mapping (a 100-entry table), 1 token.
- ``max``: the largest of three digits, 1 token.

The reward of a response is the fraction of its answer tokens that are right (0 or 1 for the
one-token tasks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["DIGITS", "TASKS", "Task", "separator_token", "task_token", "vocab_size"]

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

    def reward(self, prompts: Tensor, responses: Tensor) -> Tensor:
        """``[n]`` fraction of answer tokens that match the right answer."""
        return (responses == self.solve(prompts)).to(torch.float32).mean(dim=1)


def _digits(length: int) -> Callable[[int, torch.Generator], Tensor]:
    def draw(n: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, DIGITS, (n, length), generator=generator)

    return draw


def _count(prompts: Tensor) -> Tensor:
    return (prompts + torch.arange(1, COUNT_LEN + 1)) % DIGITS


def _mul(prompts: Tensor) -> Tensor:
    return (prompts[:, :1] * prompts[:, 1:2]) % DIGITS


def _max(prompts: Tensor) -> Tensor:
    return prompts.max(dim=1, keepdim=True).values


COUNT_LEN = 8
TASKS: tuple[Task, ...] = (
    Task("count", prompt_len=1, answer_len=COUNT_LEN, draw=_digits(1), solve=_count),
    Task("mul", prompt_len=2, answer_len=1, draw=_digits(2), solve=_mul),
    Task("max", prompt_len=3, answer_len=1, draw=_digits(3), solve=_max),
)


def task_token(index: int) -> int:
    """The token that tells the policy which task a prompt belongs to (after the digits)."""
    return DIGITS + index


def separator_token(num_tasks: int) -> int:
    """The token between a prompt and its answer."""
    return DIGITS + num_tasks


def vocab_size(num_tasks: int) -> int:
    """Input vocabulary: digits, one token per task, the separator."""
    return DIGITS + num_tasks + 1
