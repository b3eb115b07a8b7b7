"""Tensor taps: ``opt.tap(tensor, group=..., labels=...)``.

A tap is the identity in the forward pass. In the backward pass the gradient arriving at the
tapped tensor is shown, row by row and tagged by group, to every tap plugin
(:meth:`~balancer.TapPlugin.tap`); each may return a rescaled gradient (Balanced-DPO at the
log-probabilities, GSA at the logits) and add to its per-step statistics. At step time those
statistics are summed over data-parallel ranks and folded into the plugin's state, so every
rank keeps an identical state.

Rescaling row ``i`` of the gradient by ``c_i`` is exactly the gradient of the loss with its
terms reweighted by ``stopgrad(c_i)``; the tap does it without the user rewriting the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from balancer._checks import check_group_name, index_row_groups
from balancer._copy import copy_state
from balancer.contract.plugin import TapPlugin
from balancer.contract.tap_event import TapEvent
from balancer.errors import CaptureError, PluginError

if TYPE_CHECKING:
    from balancer.contract.backend import Backend
    from balancer.contract.plugin import Plugin, State


def row_groups(tensor: Tensor, group: str | Sequence[str]) -> tuple[tuple[str, ...], Tensor]:
    rows = tensor.shape[0]
    if isinstance(group, str):
        check_group_name(group)
        return (group,), torch.zeros(rows, dtype=torch.long, device=tensor.device)
    per_row = list(group)
    if len(per_row) != rows:
        raise CaptureError(
            f"opt.tap(..., group=[...]) needs one group name per row: the tensor has {rows} rows "
            f"(dimension 0), found {len(per_row)} names."
        )
    return index_row_groups(per_row, tensor.device)


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, on_grad: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        ctx.on_grad = on_grad
        ctx.save_for_backward(tensor)
        return tensor.view_as(tensor)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (value,) = ctx.saved_tensors
        return ctx.on_grad(grad, value), None


class TapHub:
    """The Balancer's side of taps: routes tapped gradients to plugins, keeps the step's stats."""

    def __init__(self, plugins: Sequence[Plugin]) -> None:
        self._plugins = tuple(p for p in plugins if isinstance(p, TapPlugin))
        self._stats: dict[str, State] = {}
        self.discard()

    def tap(
        self,
        tensor: Tensor,
        group: str | Sequence[str],
        labels: Tensor | None,
        states: Callable[[], dict[str, State]],
    ) -> Tensor:
        if not isinstance(tensor, Tensor):
            raise CaptureError(f"opt.tap() takes a tensor. Found `{type(tensor).__name__}`.")
        if tensor.dim() == 0:
            raise CaptureError(
                "opt.tap() needs a tensor with rows along dimension 0; for a scalar, tap `t.reshape(1)`."
            )
        names, index = row_groups(tensor, group)
        if labels is not None:
            if not isinstance(labels, Tensor) or labels.dim() == 0 or labels.shape[0] != tensor.shape[0]:
                found = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
                raise CaptureError(
                    f"opt.tap(..., labels=...) needs a tensor with one entry per row ({tensor.shape[0]} rows). "
                    f"Found `{found}`."
                )
            labels = labels.detach()
        if not self._plugins or not tensor.requires_grad:
            return tensor

        def on_grad(grad: Tensor, value: Tensor) -> Tensor:
            self.seen += 1
            current = states()
            for plugin in self._plugins:
                event = TapEvent(grad=grad, value=value, names=names, group_index=index, labels=labels)
                try:
                    new_grad, new_stats = plugin.tap(event, current[plugin.name], self._stats[plugin.name])
                except Exception as exc:
                    raise PluginError(f"Plugin `{plugin.name}` failed in tap(): {type(exc).__name__}: {exc}.") from exc
                self._check(plugin, grad, new_grad, new_stats)
                grad, self._stats[plugin.name] = new_grad, new_stats
            return grad

        return _Tap.apply(tensor, on_grad)

    def _check(self, plugin: TapPlugin, grad: Tensor, new_grad: Any, new_stats: Any) -> None:
        if not isinstance(new_grad, Tensor) or new_grad.shape != grad.shape:
            shape = tuple(new_grad.shape) if isinstance(new_grad, Tensor) else type(new_grad).__name__
            raise PluginError(
                f"Plugin `{plugin.name}` tap() must return a gradient of shape {tuple(grad.shape)}. Found `{shape}`."
            )
        expected = self._stats[plugin.name]
        if not isinstance(new_stats, dict) or set(new_stats) != set(expected):
            found = sorted(new_stats) if isinstance(new_stats, dict) else type(new_stats).__name__
            raise PluginError(
                f"Plugin `{plugin.name}` tap() must return tap stats with the keys of init_tap_stats() "
                f"{sorted(expected)}. Found `{found}`."
            )

    def discard(self) -> None:
        """Forgets this step's tap statistics (their gradients were discarded or skipped)."""
        self._stats = {p.name: p.init_tap_stats() for p in self._plugins}
        self.seen = 0  # tapped gradients shown to the plugins in this step

    def merge(self, states: dict[str, State], backend: Backend) -> dict[str, State]:
        """Sums the step's statistics over ranks and folds them into new plugin states."""
        if not self._plugins:
            return states
        reduced = _reduce(self._stats, backend)
        new_states = dict(states)
        for plugin in self._plugins:
            try:
                new_states[plugin.name] = plugin.merge_tap_stats(
                    copy_state(states[plugin.name]), copy_state(reduced[plugin.name])
                )
            except Exception as exc:
                raise PluginError(
                    f"Plugin `{plugin.name}` failed in merge_tap_stats(): {type(exc).__name__}: {exc}. "
                    "Step refused; parameters and plugin states untouched."
                ) from exc
        return new_states


def _reduce(stats: dict[str, State], backend: Backend) -> dict[str, State]:
    """Sums every tensor of every plugin's tap stats across ranks: two collectives in all.

    Tensors are zero-padded along dimension 0 to the longest rank's length (one max-reduce of
    the lengths), then packed into one float64 buffer for one sum-reduce.
    """
    keys = [(plugin, key) for plugin, entry in stats.items() for key in sorted(entry)]
    tensors = [torch.as_tensor(stats[p][k]) for p, k in keys]
    if backend.world_size == 1 or not tensors:
        return stats
    device = backend.stats_device
    local = torch.tensor([t.shape[0] if t.dim() else 0 for t in tensors], dtype=torch.int64, device=device)
    lengths = backend.all_reduce(local, "max").tolist()
    padded = []
    for t, length in zip(tensors, lengths, strict=True):
        if t.dim() and t.shape[0] < length:
            t = torch.cat([t, t.new_zeros((length - t.shape[0], *t.shape[1:]))])
        padded.append(t)
    flat = backend.all_reduce(torch.cat([t.to(device, torch.float64).reshape(-1) for t in padded]), "sum")
    out: dict[str, State] = {p: dict(entry) for p, entry in stats.items()}
    offset = 0
    for (plugin, key), t in zip(keys, padded, strict=True):
        out[plugin][key] = flat[offset : offset + t.numel()].reshape(t.shape).to(t.device, t.dtype)
        offset += t.numel()
    return out
