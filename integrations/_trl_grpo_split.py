"""The exact split of GRPO's loss by task, used by ``BalancedGRPOTrainer.balanced_backward``.

GRPO's loss is a sum over completions, and each completion's terms depend only on its own per-token
log-probabilities. So the gradient of the loss at the log-probabilities, cut by rows (completions)
and pushed down through the model one task at a time, is each task's share of the gradient, exactly.
The pieces:

* :class:`ModelOutputsAsLeaves` stands in for the model in TRL's ``compute_loss``: it calls the model
  and hands TRL detached copies (leaves) of the per-token log-probabilities, entropies and MoE
  auxiliary loss, keeping the real tensors. The gradient of the loss at the leaves is then cheap:
  only TRL's loss arithmetic lies between them and the loss.
* :func:`split_gradient` takes that gradient apart. With ``beta != 0`` the trainer computes TRL's
  loss a second time on the same outputs with ``beta = 0``; its gradient at the log-probabilities
  is the policy part, the difference is the KL part, whatever the KL estimator. The KL, entropy
  and auxiliary-loss parts come back as one scalar whose gradient is theirs (ungrouped, weight 1).
  :func:`without_kl` is that second call's setting (its side effects on the trainer are undone).
* :func:`agree_on_groups` (under DDP) makes every rank capture the same tasks in the same order.
* :func:`embedding_leaf_detached` keeps PEFT's frozen-embedding output from reaching the
  Balancer as a gradient leaf that no optimizer holds.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from balancer._checks import graph_leaves

from ._hf_groups import GroupingError

__all__ = [
    "ModelOutputsAsLeaves",
    "agree_on_groups",
    "embedding_leaf_detached",
    "leaf_gradients",
    "names_on_all_ranks",
    "split_gradient",
    "without_kl",
]

# What GRPOTrainer._compute_loss reads or changes besides computing the loss: restored after the second call.
_LOSS_SIDE_EFFECTS = ("beta", "_metrics", "entropy_coef", "_last_world_entropy", "_entropy_window_stats")


class ModelOutputsAsLeaves:
    """Stands in for the model in TRL's ``compute_loss``: calls it, and replaces every output tensor that
    requires grad (log-probabilities, entropies, auxiliary loss) by a detached leaf, keeping the real one.
    With ``grad=False`` the model runs without gradient and every floating-point output becomes a leaf
    (DeepSpeed: the leaves' gradients are the coefficients of the per-task passes). After :meth:`replay`,
    calls return the recorded outputs (same leaves) in order, without a forward pass."""

    def __init__(self, model: Any, grad: bool = True) -> None:
        self.model = model
        self.grad = grad  # False: the forward runs without gradient (its outputs give coefficients only)
        self.pairs: dict[str, list[tuple[Tensor, Tensor]]] = {}  # output key -> [(real tensor, its leaf)]
        self.outputs: list[Any] = []
        self.replayed: int | None = None

    def replay(self) -> None:
        self.replayed = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.replayed is not None:
            if self.replayed >= len(self.outputs):
                raise GroupingError("compute_loss called the model more often on the same batch the second time.")
            self.replayed += 1
            return self.outputs[self.replayed - 1]
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            outputs = self.model(*args, **kwargs)
        for key in list(outputs.keys()):
            real = outputs[key]
            if isinstance(real, Tensor) and (real.requires_grad or (not self.grad and real.is_floating_point())):
                leaf = real.detach().requires_grad_()
                setattr(outputs, key, leaf)
                self.pairs.setdefault(key, []).append((real, leaf))
        if "log_probs" not in self.pairs:
            raise GroupingError(
                "The model's output carries no `log_probs` (that require grad): BalancedGRPOTrainer splits the loss at "
                "the per-token log-probabilities of TRL's fused LM head (`fused_lm_head=True`)."
            )
        self.outputs.append(outputs)
        return outputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def leaf_gradients(
    loss: Tensor, policy_loss: Tensor | None, pairs: dict[str, list[tuple[Tensor, Tensor]]]
) -> tuple[Tensor, dict[str, list[Tensor | None]]]:
    """``(policy, rest)``: ``policy`` the gradient at the log-probabilities (chunks concatenated by rows) of the
    loss without its KL term (``policy_loss``, or ``loss`` when it has none); ``rest`` for each output key the
    gradient of the remaining part of ``loss`` at each chunk's leaf (the KL part for ``"log_probs"``), ``None``
    where that part does not reach it."""
    leaves = [leaf for items in pairs.values() for _, leaf in items]
    _only_leaves(loss, leaves)
    logp = [leaf for _, leaf in pairs["log_probs"]]
    found = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = {id(t): g for t, g in zip(leaves, found, strict=True)}
    total = [torch.zeros_like(t) if grads[id(t)] is None else grads[id(t)] for t in logp]
    rest: dict[str, list[Tensor | None]] = {k: [grads[id(leaf)] for _, leaf in items] for k, items in pairs.items()}
    rest["log_probs"] = [None] * len(logp)
    policy = total
    if policy_loss is not None:
        found = torch.autograd.grad(policy_loss, logp, allow_unused=True)
        policy = [torch.zeros_like(t) if g is None else g for t, g in zip(logp, found, strict=True)]
        rest["log_probs"] = [t - p for t, p in zip(total, policy, strict=True)]
    return torch.cat(policy), rest


def split_gradient(
    loss: Tensor, policy_loss: Tensor | None, pairs: dict[str, list[tuple[Tensor, Tensor]]]
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(at, policy, ungrouped)``: ``at`` the real log-probabilities (one node of their own), ``policy`` as in
    :func:`leaf_gradients`, and a scalar whose gradient is the rest of ``loss``'s (KL through a second handle on
    the log-probabilities, entropy bonus, auxiliary loss), or ``None`` when there is no rest."""
    policy, rest = leaf_gradients(loss, policy_loss, pairs)
    terms = [
        (grad * real).sum()
        for key, items in pairs.items()
        for (real, _), grad in zip(items, rest[key], strict=True)
        if grad is not None
    ]
    at = torch.cat([real for real, _ in pairs["log_probs"]])
    return at, policy, (torch.stack(terms).sum() if terms else None)


@contextlib.contextmanager
def without_kl(trainer: Any) -> Iterator[None]:
    """``beta = 0`` on a ``GRPOTrainer`` for a second ``compute_loss`` on the same outputs, whose side effects
    (metrics, the adaptive entropy controller's state) are undone afterwards."""
    kept = {name: getattr(trainer, name) for name in _LOSS_SIDE_EFFECTS if hasattr(trainer, name)}
    trainer.beta = 0.0
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    try:
        yield
    finally:
        for name, value in kept.items():
            setattr(trainer, name, value)


def _only_leaves(loss: Tensor, leaves: list[Tensor]) -> None:
    """Refuses a loss that reaches a tensor requiring grad other than the stand-in leaves (a parameter used
    outside the model's forward): that part of its gradient would be lost."""
    known = {id(t) for t in leaves}
    foreign = [t for t in graph_leaves([loss]) if id(t) not in known]
    if foreign:
        raise GroupingError(
            f"The GRPO loss depends on a tensor of shape {tuple(foreign[0].shape)} that requires grad other than "
            "through the model's outputs, so its gradient cannot be split by task. Compute every term of the "
            "loss from the model's outputs in compute_loss, or override balanced_backward."
        )


def agree_on_groups(
    at: Tensor, policy: Tensor, names: list[str], also: Sequence[str] = ()
) -> tuple[Tensor, Tensor, list[str]]:
    """Under DDP every rank must capture the same groups in the same order: the groups present on any rank,
    and ``also`` (groups an earlier micro-batch of the step captured, which must join the synchronised
    backward), sorted. A group this rank has no completion of gets a row carrying a zero gradient (``at``'s
    first row times 0), so its pass adds zeros here and the rank joins the group's all-reduce."""
    union = sorted(names_on_all_ranks([*names, *also]))
    present = set(names)
    every = names + [n for n in union if n not in present]  # one zero row per missing group, at the end
    order = sorted(range(len(every)), key=lambda i: union.index(every[i]))
    if len(every) == len(names) and order == list(range(len(names))):
        return at, policy, names
    extra = len(every) - len(names)
    at = torch.cat([at, (at[:1] * 0.0).expand(extra, *at.shape[1:])])
    policy = torch.cat([policy, policy.new_zeros((extra, *policy.shape[1:]))])
    rows = torch.tensor(order, device=at.device)
    return at.index_select(0, rows), policy.index_select(0, rows), [every[i] for i in order]


def names_on_all_ranks(names: list[str]) -> set[str]:
    """The names present on any data-parallel rank (one ``all_gather_object``)."""
    import torch.distributed as dist

    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(set(names)))
    return {name for part in gathered for name in part or []}


@contextlib.contextmanager
def embedding_leaf_detached(model: Any) -> Iterator[None]:
    """TRL and PEFT make a frozen embedding's output require grad under gradient checkpointing (PEFT/LoRA), which
    only reentrant checkpointing (refused here) needs. That output is a leaf no optimizer holds, which the
    Balancer's graph check refuses: a forward hook registered now (after theirs, so it runs last) detaches it."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if not isinstance(embeddings, torch.nn.Module):
        yield
        return

    def detach_leaf(module: torch.nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, Tensor) and output.requires_grad and output.grad_fn is None:
            return output.detach()
        return output

    handle = embeddings.register_forward_hook(detach_leaf)
    try:
        yield
    finally:
        handle.remove()
