"""DPO helpers: sequence log-probabilities, the DPO loss, and its exact chosen/rejected split.

Notation (Rafailov et al., *Direct Preference Optimization*, NeurIPS 2023): for a pair with
chosen response ``y_w`` and rejected ``y_l``, ``s_w = log π(y_w|x) − log π_ref(y_w|x)``,
``s_l`` likewise, ``u = β (s_w − s_l)`` and ``L = −log σ(u)``. Its gradient is
``∇L = −β σ(−u) (∇log π_w − ∇log π_l)``. With ``c = stopgrad(β σ(−u))`` the two surrogate
losses ``L_w = −c · log π_w`` and ``L_l = +c · log π_l`` have gradients that sum to ``∇L``
exactly, so "chosen" and "rejected" are well-defined gradient groups::

    logp_w, logp_l = tap_pairs(opt, logp_w, logp_l)           # only needed for tap rules
    opt.backward(dpo_group_losses(logp_w, logp_l, ref_w, ref_l, beta=0.1))
    opt.step()
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dpo_group_losses", "dpo_loss", "dpo_metrics", "sequence_logprobs", "tap_pairs"]


def sequence_logprobs(
    logits: Tensor, labels: Tensor, mask: Tensor | None = None, *, reduction: Literal["sum", "mean"] = "sum"
) -> Tensor:
    """Per-sequence log-probabilities ``[B]`` of ``labels`` under ``logits``.

    Args:
        logits: ``[B, T, V]``, already aligned with ``labels`` (position t predicts ``labels[:, t]``).
        labels: ``[B, T]`` token ids; entries where ``mask`` is false are ignored (any value,
            e.g. ``-100``).
        mask: ``[B, T]`` bool or 0/1; ``None`` counts every token.
        reduction: ``"sum"`` (the sequence log-probability) or ``"mean"`` (per-token mean; a
            sequence with no counted token gets 0).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"sequence_logprobs needs logits [B, T, V] and labels [B, T]. "
            f"Found logits {tuple(logits.shape)} and labels {tuple(labels.shape)}."
        )
    if reduction not in ("sum", "mean"):
        raise ValueError(f"`reduction` must be 'sum' or 'mean'. Found `{reduction!r}`.")
    keep = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    if keep.shape != labels.shape:
        raise ValueError(f"`mask` must have the labels' shape {tuple(labels.shape)}. Found {tuple(keep.shape)}.")
    index = torch.where(keep, labels, torch.zeros_like(labels)).unsqueeze(-1)
    token = logits.log_softmax(-1).gather(-1, index).squeeze(-1)
    total = torch.where(keep, token, torch.zeros_like(token)).sum(-1)
    if reduction == "sum":
        return total
    return total / keep.sum(-1).clamp_min(1).to(total.dtype)


def _margin(logp_w: Tensor, logp_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> Tensor:
    if beta <= 0:
        raise ValueError(f"`beta` must be positive. Found `beta = {beta}`.")
    return beta * ((logp_w - ref_w.detach()) - (logp_l - ref_l.detach()))


def dpo_loss(logp_w: Tensor, logp_l: Tensor, ref_w: Tensor, ref_l: Tensor, *, beta: float = 0.1) -> Tensor:
    """The mean DPO loss ``−log σ(β (s_w − s_l))`` over pairs (reference log-probs are detached)."""
    return -F.logsigmoid(_margin(logp_w, logp_l, ref_w, ref_l, beta)).mean()


def dpo_group_losses(
    logp_w: Tensor,
    logp_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    *,
    beta: float = 0.1,
    chosen: str = "chosen",
    rejected: str = "rejected",
) -> dict[str, Tensor]:
    """``{chosen: mean(−c·log π_w), rejected: mean(+c·log π_l)}`` with ``c = stopgrad(β σ(−u))``.

    Their gradients sum exactly to the gradient of :func:`dpo_loss`; their values are surrogate
    numbers, not losses (``opt.backward`` records them in ``stats.losses``).
    """
    c = beta * torch.sigmoid(-_margin(logp_w, logp_l, ref_w, ref_l, beta)).detach()
    return {chosen: -(c * logp_w).mean(), rejected: (c * logp_l).mean()}


@torch.no_grad()
def dpo_metrics(logp_w: Tensor, logp_l: Tensor, ref_w: Tensor, ref_l: Tensor, *, beta: float = 0.1) -> dict[str, Any]:
    """Mean chosen/rejected log-probs and implicit rewards ``β s``, reward margin and accuracy (tensors)."""
    reward_w = beta * (logp_w - ref_w)
    reward_l = beta * (logp_l - ref_l)
    return {
        "logp_chosen": logp_w.mean(),
        "logp_rejected": logp_l.mean(),
        "reward_chosen": reward_w.mean(),
        "reward_rejected": reward_l.mean(),
        "reward_margin": (reward_w - reward_l).mean(),
        "reward_accuracy": (reward_w > reward_l).to(logp_w.dtype).mean(),
    }


def tap_pairs(
    opt: Any, logp_w: Tensor, logp_l: Tensor, *, chosen: str = "chosen", rejected: str = "rejected"
) -> tuple[Tensor, Tensor]:
    """Taps the chosen and rejected log-probs as one tensor, rows labelled by pair index.

    Tap rules that compare the two sides of a pair (``balanced_dpo`` with ``rule="prob"``) see
    both in one event; the label of row ``i`` of either side is ``i``.
    """
    if logp_w.dim() != 1 or logp_w.shape != logp_l.shape:
        raise ValueError(
            f"tap_pairs needs chosen and rejected log-probs of the same shape [B]. "
            f"Found {tuple(logp_w.shape)} and {tuple(logp_l.shape)}."
        )
    pairs = logp_w.shape[0]
    pair_id = torch.arange(pairs, device=logp_w.device)
    tapped = opt.tap(
        torch.cat([logp_w, logp_l]), group=[chosen] * pairs + [rejected] * pairs, labels=torch.cat([pair_id, pair_id])
    )
    return tapped[:pairs], tapped[pairs:]
