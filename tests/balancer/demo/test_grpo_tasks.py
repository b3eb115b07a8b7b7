"""The demo's tasks, rewards, last-layer estimate and gradient-proportional sampling, checked by hand."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from balancer.demo.grpo import GRPOConfig, Policy, prompt_counts, rollout, task_losses
from balancer.demo.tasks import NATURE_TASKS, vocab_size

COPY, CMP, MUL = NATURE_TASKS


def test_the_nature_tasks_have_equal_answer_lengths_and_their_own_rewards():
    assert [t.answer_len for t in NATURE_TASKS] == [2, 2, 2]
    prompts = torch.tensor([[3, 7], [9, 9]])
    assert COPY.solve(prompts).tolist() == [[7, 3], [9, 9]]
    assert CMP.solve(torch.tensor([[5, 2, 8], [1, 1, 0]])).tolist() == [[1, 0], [0, 1]]
    assert MUL.solve(prompts).tolist() == [[2, 1], [8, 1]]
    # partial credit for copy, all or nothing for mul
    assert COPY.reward(prompts, torch.tensor([[7, 0], [9, 9]])).tolist() == [0.5, 1.0]
    assert MUL.reward(prompts, torch.tensor([[2, 0], [8, 1]])).tolist() == [0.0, 1.0]


def test_last_layer_split_half_estimate_against_float64_reference():
    torch.manual_seed(0)
    cfg = GRPOConfig(prompts=4, rollouts=4)
    policy = Policy(vocab_size(3), 16)
    batch = rollout(policy, NATURE_TASKS, 0, cfg.prompts, cfg.rollouts, torch.Generator().manual_seed(1))
    (loss_a, loss_b), info = task_losses(policy, batch, cfg)

    head = list(policy.head.parameters())
    g_a, g_b = (
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(x, head, retain_graph=True)]) for x in (loss_a, loss_b)
    )
    assert info["sq_norm_last"] == pytest.approx(4.0 * float(g_a.double() @ g_b.double()), rel=1e-6)
    assert info["sq_norm_last_naive"] == pytest.approx(float((g_a.double() + g_b.double()).square().sum()), rel=1e-6)
    assert info["prompts"] == 4.0


def test_the_task_loss_is_the_mean_over_responses_and_tokens_at_ratio_one():
    torch.manual_seed(0)
    cfg = GRPOConfig(prompts=4, rollouts=4)
    policy = Policy(vocab_size(3), 16)
    batch = rollout(policy, NATURE_TASKS, 1, cfg.prompts, cfg.rollouts, torch.Generator().manual_seed(2))
    (loss_a, loss_b), _ = task_losses(policy, batch, cfg)
    seq = dataclasses.replace(cfg, loss_norm="sequence")
    (seq_a, seq_b), _ = task_losses(policy, batch, seq)

    expected = -batch.advantages.sum() / batch.advantages.numel()  # ratio 1: each token term is Â
    torch.testing.assert_close(loss_a + loss_b, expected)
    torch.testing.assert_close(seq_a + seq_b, 2 * expected)  # 2 tokens per answer


@pytest.mark.parametrize(
    ("sq_norms", "expected"),
    [
        ([1.0, 1.0, 1.0], [8, 8, 8]),
        ([0.0, 0.0, 3.0], [2, 2, 20]),  # one pair each, the 9 spare pairs all to the only positive task
        ([1.0, -5.0, 2.0], [8, 2, 14]),  # negative counts as 0; 9 spare pairs: 3 and 6
        ([-1.0, float("nan"), 0.0], [8, 8, 8]),  # nothing positive: uniform
        ([1.0, 1.0, 2.0], [6, 6, 12]),  # 2.25, 2.25, 4.5 spare pairs: the last pair goes to the largest remainder, 0.5
    ],
)
def test_gradient_proportional_prompt_counts(sq_norms, expected):
    counts = prompt_counts(sq_norms, 8)
    assert counts == expected and sum(counts) == 24 and all(c % 2 == 0 for c in counts)
