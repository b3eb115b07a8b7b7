"""Finding the ``nn.Linear`` calls in an autograd graph, for :mod:`balancer.capture.layer_capture`.

This module depends on torch internals that are not a public API: the class names of autograd
nodes (``AddmmBackward0``, ``MmBackward0``, ``AddBackward0``, ``TBackward0``,
``ToCopyBackward0``, ``ViewBackward0``, ``UnsafeViewBackward0``, ``ReshapeAliasBackward0``) and
their saved attributes (``_saved_mat1``, ``_saved_self``, ``_saved_alpha``, ``_saved_beta``,
``_input_metadata``). Checked on torch 2.13. If a release renames a linear node, its parameters
are reported as receiving gradient outside an ``nn.Linear`` call (a
:class:`~balancer.errors.CaptureError`) rather than mis-captured; a renamed view node would skip
the batch-first check. ``tests/balancer/capture/test_layer_capture_nodes.py`` checks every form
below against the installed torch: run it first after a torch upgrade.

How ``F.linear`` appears in the graph: ``addmm(bias, x, weightᵀ)``, or ``mm(x, weightᵀ)`` without
a bias (a bias added apart is an ``add``); inputs of more than two dimensions are flattened to 2-d
and the output is viewed back; under autocast the parameter first goes through a ``_to_copy``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from balancer.errors import CaptureError

__all__ = ["LinearUse", "check_batch_first", "find_linear_calls", "leaf", "recognise"]

LinearUse = tuple[Tensor, str]
"""A parameter used by a linear call, and its role there: ``"weight"`` or ``"bias"``."""

Owners = dict[int, tuple[str, str]]
"""``id(param) → (qualified name, role)`` of the trained ``nn.Linear`` parameters."""


def leaf(node: Any, through_t: bool) -> Any:
    """The parameter behind ``node`` (``[TBackward0 →] [ToCopyBackward0 →] AccumulateGrad``), or None."""
    if through_t:
        if node is None or type(node).__name__ != "TBackward0":
            return None
        node = node.next_functions[0][0]
    if node is not None and type(node).__name__ == "ToCopyBackward0":  # autocast's copy of the parameter
        node = node.next_functions[0][0]
    return getattr(node, "variable", None)


def recognise(node: Any, owners: Owners) -> tuple[Tensor | None, list[LinearUse], set[int]]:
    """``(saved input, [(param, role)], claimed input slots)`` of a linear node, else ``(None, [], {})``."""
    kind = type(node).__name__
    nexts = [fn for fn, _ in node.next_functions]
    if kind in ("AddmmBackward0", "MmBackward0"):
        if kind == "AddmmBackward0" and node._saved_alpha != 1:
            return None, [], set()
        slot = 2 if kind == "AddmmBackward0" else 1
        weight = leaf(nexts[slot], through_t=True)
        x, uses, claimed = None, [], set()
        if weight is not None and owners.get(id(weight), ("", ""))[1] == "weight":
            x = (node._saved_mat1 if kind == "AddmmBackward0" else node._saved_self).detach()
            uses, claimed = [(weight, "weight")], {slot}
        bias = leaf(nexts[0], through_t=False) if kind == "AddmmBackward0" else None
        if bias is not None and owners.get(id(bias), ("", ""))[1] == "bias" and node._saved_beta == 1:
            uses.append((bias, "bias"))
            claimed.add(0)
        return x, uses, claimed
    if kind == "AddBackward0" and node._saved_alpha == 1:
        for slot, nxt in enumerate(nexts):
            bias = leaf(nxt, through_t=False)
            if bias is not None and owners.get(id(bias), ("", ""))[1] == "bias":
                return None, [(bias, "bias")], {slot}
    return None, [], set()


def check_batch_first(parent: Any, batch: int) -> None:
    """A ``[B, T, d]`` input reaches ``mm`` flattened, and the view back to ``[B, T, d_out]`` is the
    layer's parent node: its leading size must be the batch (a ``[T, B, d]`` layout would
    silently mix samples)."""
    if type(parent).__name__ not in ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"):
        return
    shape = tuple(parent._input_metadata[0].shape)
    if len(shape) > 2 and shape[0] != batch:
        raise CaptureError(
            f"backward_samples: a linear layer's output has shape {shape} for {batch} samples. The batch "
            "dimension must lead every layer's input ([B, d] or [B, T, d]); transpose [T, B, d] inputs."
        )


def find_linear_calls(
    roots: list[Any], owners: Owners, batch: int | None
) -> list[tuple[Any, Tensor | None, list[LinearUse]]]:
    """Walks the graph once: ``(node, saved input, [(param, role)])`` for every linear call.

    ``batch``: the number of samples whose layout :func:`check_batch_first` checks (None: no check).
    Refuses a trained tensor that receives gradient outside every recognised linear call.
    """
    found, seen, foreign = [], {}, []
    stack: list[tuple[Any, Any]] = [(root, None) for root in roots]
    while stack:
        node, parent = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node  # keeps the wrapper alive, so ids are not reused during the walk
        x, uses, claimed = recognise(node, owners)
        if uses:
            found.append((node, x, uses))
            if batch is not None:
                check_batch_first(parent, batch)
        variable = getattr(node, "variable", None)
        if variable is not None and variable.requires_grad:
            foreign.append(owners.get(id(variable), (f"a tensor of shape {tuple(variable.shape)}", ""))[0])
        stack.extend((nxt, node) for i, (nxt, _) in enumerate(node.next_functions) if i not in claimed)
    if foreign:
        raise CaptureError(
            f"backward_samples/backward_tasks: {sorted(set(foreign))} receive gradient outside an nn.Linear "
            "call (weight tying, a penalty on the weights, an input that requires grad...). Only F.linear "
            "uses are supported. A [batch, seq, hidden] tensor here is usually the embedding output that "
            "transformers' `model.enable_input_require_grads()` makes require grad (gradient checkpointing with "
            "frozen embeddings, e.g. PEFT/LoRA): call `model.disable_input_require_grads()` and checkpoint with "
            "`gradient_checkpointing_kwargs={'use_reentrant': False}`, which does not need it."
        )
    return found
