"""``Balancer``: a ``torch.optim.Optimizer`` that reweights group gradients, then lets the
wrapped optimizer step.

One step, as data flows::

    with opt.group(name): loss.backward()   # grads land in group rows (views, no copy)
    opt.step():  G = A Aᵀ  ->  w = p_n(... p_1(stats, 1) ...)  ->  clip  ->  grad = ungrouped + Aᵀ w  ->  inner.step()

The class is a facade over modules with one job each: the ``torch.optim.Optimizer`` contract
(:mod:`balancer._forwarding_optimizer`), what is captured for the next step
(:mod:`balancer.step.pending`), the step, planned first and committed only if the inner step succeeds
(:mod:`balancer.step.plan`, :mod:`balancer.step.run`), and checkpoints (:mod:`balancer._balancer_state`).

Gradients produced outside every group block are added to the update as they are (weight 1).
A group that receives no gradient in a step is simply absent: plugins see only the groups
present, its weight is not computed, and its plugin state (e.g. an EMA) is left untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from balancer._balancer_state import change_plugin_state, load_section, load_state_dict, make_section, make_state_dict
from balancer._checks import check_graph_leaves, check_losses, check_model_params, check_options
from balancer._forwarding_optimizer import ForwardingOptimizer
from balancer.capture.layer_capture import LayerCapture
from balancer.capture.local import LocalBackend
from balancer.capture.rows import capture_rows, check_rows
from balancer.capture.taps import TapHub
from balancer.config import BalancerConfig, NonFinitePolicy, build_plugins, resolve_config
from balancer.contract.backend import Backend
from balancer.contract.chain import Chain
from balancer.contract.combine import check_combine_rules
from balancer.contract.plugin import Plugin, State
from balancer.contract.registry import Registry, default_registry
from balancer.contract.stats import GroupStats
from balancer.errors import CaptureError
from balancer.step.clip import ClipRequest, check_clip
from balancer.step.pending import PendingStep
from balancer.step.plan import show_scaler
from balancer.step.run import clip_step, run_step

__all__ = ["Balancer"]


def _select_backend(target: Any, registry: Registry | None) -> Backend:
    backend = (registry or default_registry).make_backend(target)
    if backend is not None:
        return backend
    if not isinstance(target, torch.optim.Optimizer):
        raise TypeError(
            f"Balancer wraps a torch.optim.Optimizer or a DeepSpeed engine. Found `{type(target).__name__}`. "
            "Create the optimizer first, e.g. Balancer(torch.optim.AdamW(model.parameters()), ...); for a "
            "DeepSpeed engine install the extra: pip install 'gradient-balancer[deepspeed]'."
        )
    return LocalBackend(target)


class Balancer(ForwardingOptimizer):
    """Wraps a torch optimizer; plugins weight the tagged group gradients before it steps.

    Args:
        inner: any ``torch.optim.Optimizer``. Its ``param_groups``, ``state`` and ``defaults`` are
            this object's (forwarded, never copied), so LR schedulers and ``GradScaler`` work on
            the Balancer as on the optimizer it wraps.
        plugins: applied in this order. Registry names (``"task_norm"``), ``(name, options)``
            pairs, ``{"name", "options"}`` dicts, plugin classes or plugin instances; or a mapping
            ``{name: options}`` (``None`` for the defaults), in its order.
        on_nonfinite: a group gradient with NaN/inf gets weight 0 and a
            :class:`~balancer.errors.NonFiniteGradientWarning` (``"zero"``), or the step is refused
            with :class:`~balancer.errors.NonFiniteGradientError` (``"raise"``). Under a
            ``GradScaler`` an overflow skips the whole step instead, as AMP expects.
        model: optional; if given, every trainable parameter of it must be in ``inner``. Needed by
            :meth:`backward_samples` and :meth:`backward_tasks`.
        max_grad_norm: clip the update the inner optimizer receives (``ungrouped + Σ_k w_k g_k``,
            unscaled under a ``GradScaler``) to this total norm at every step, with the semantics
            of ``torch.nn.utils.clip_grad_norm_``; ``last_stats.grad_norm``/``clip_coef`` report
            it. While groups are pending ``.grad`` does not hold the update, so clip here or with
            :meth:`clip_grad_norm_`, never with ``torch.nn.utils.clip_grad_norm_``.
        norm_type: the norm of ``max_grad_norm`` (2.0, any p > 0, or ``"inf"``).

    Example::

        opt = Balancer(torch.optim.AdamW(model.parameters(), lr=1e-4), plugins=["task_norm"])
        with opt.group("math"):
            loss_math.backward()
        with opt.group("code"):
            loss_code.backward()
        opt.step()
        opt.zero_grad()
    """

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        plugins: Iterable[Any] = (),
        *,
        on_nonfinite: NonFinitePolicy = "zero",
        model: torch.nn.Module | None = None,
        max_grad_norm: float | None = None,
        norm_type: float | str = 2.0,
        registry: Registry | None = None,
        backend: Backend | None = None,
    ) -> None:
        if isinstance(inner, Balancer):
            raise TypeError("Balancer(Balancer(...)): wrap the inner optimizer once and list all plugins there.")
        check_options(on_nonfinite, max_grad_norm, norm_type)
        self._clip = None if max_grad_norm is None else ClipRequest.make(max_grad_norm, norm_type)
        self._plugins: tuple[Plugin, ...] = tuple(build_plugins(plugins, registry))
        self._backend: Backend = backend if backend is not None else _select_backend(inner, registry)
        self._inner = self._backend.optimizer
        Chain(self._plugins)  # refuses an order that cannot work (a plugin that needs an earlier one, first)
        check_combine_rules(self._plugins, self._backend)
        if self._clip is not None:
            check_clip(self._backend, self._clip, "max_grad_norm")
        if model is not None:
            check_model_params(model, self._backend.trained_parameters())
        self._plugin_states: dict[str, State] = {p.name: p.init() for p in self._plugins}
        layers = LayerCapture(model, self._backend) if model is not None else None
        self._pending = PendingStep(self._backend, layers, TapHub(self._plugins))
        self.on_nonfinite: NonFinitePolicy = on_nonfinite
        self.last_stats: GroupStats | None = None
        self._step_count = 0
        self._rows_seen = 0  # the most groups seen in one step
        self._graph_checked = False
        self._warned: set[str] = set()  # warnings already shown (once per Balancer)
        self._init_optimizer_machinery()
        self._backend.attach(self)

    @classmethod
    def from_config(
        cls, inner: torch.optim.Optimizer, config: BalancerConfig | Mapping[str, Any] | str, **kwargs: Any
    ) -> Balancer:
        """Builds a Balancer from a config dict, a JSON file path or a :class:`BalancerConfig`."""
        cfg, plugins = resolve_config(config, kwargs.get("registry"))
        return cls(inner, plugins, **cfg.balancer_kwargs(), **kwargs)

    @property
    def plugins(self) -> tuple[Plugin, ...]:
        return self._plugins

    @property
    def plugin_states(self) -> Mapping[str, State]:
        """Each plugin's current state, by plugin name (read-only view)."""
        return dict(self._plugin_states)

    def update_plugin_state(self, name: str, change: Callable[[State], State]) -> None:
        """Replaces plugin ``name``'s state by ``change(state)`` (``change`` gets a copy).

        The new state is checked as a loaded one is (tensors and Python scalars only, and the
        plugin's own :meth:`~balancer.Plugin.check_state`); if it is refused the state is left as
        it was. Call it on every rank with the same change: plugin state must stay identical.
        Example: ``ReplayBias.start_task(opt)`` resets the task step counter this way.
        """
        change_plugin_state(self, name, change)

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def max_grad_norm(self) -> float | None:
        """The norm every step clips the update to (``None``: no clipping at step time)."""
        return None if self._clip is None else self._clip.max_norm

    # -- capture -----------------------------------------------------------------------------
    def group(self, name: str) -> AbstractContextManager[None]:
        """Gradients from backward passes inside this block belong to group ``name``."""
        return self._pending.group(name)

    def backward(self, losses: Mapping[str, Tensor], *, retain_graph: bool | None = None) -> None:
        """Runs one backward pass per group: ``opt.backward({"math": l1, "code": l2})``.

        Losses may share a graph: every backward but the last retains it. The loss values are
        recorded for the plugins (``stats.losses``).
        """
        check_losses("backward()", losses)
        self._check_graph_once(losses.values())
        self._pending.backward(losses, retain_graph)

    def backward_samples(self, losses: Tensor, *, group: str | Sequence[str], retain_graph: bool | None = None) -> None:
        """One backward pass for groups of samples: ``opt.backward_samples(losses, group=row_groups)``.

        Args:
            losses: ``[B]`` per-sample losses (``reduction="none"``). A group's loss is the sum of
                its samples' terms: divide by the group's size yourself for a per-group mean.
            group: one group name per sample, or one name for all.
            retain_graph: passed to the backward pass.

        The exact group Gram matrix and the weighted update ``Σ_k w_k g_k`` are computed from the
        ``nn.Linear`` inputs and output gradients of this single backward pass, without any
        per-group gradient (see :mod:`balancer.capture.layer_capture`); ``step()`` then runs as usual.
        Needs ``Balancer(..., model=model)`` whose trained parameters all belong to ``nn.Linear``
        layers, the local backend, and no ``group``/``backward`` capture in the same step. Several
        calls before ``step()`` accumulate exactly, and may be mixed with :meth:`backward_tasks`.
        """
        capture = self._pending.layer_capture("backward_samples")
        group = group if isinstance(group, str) else list(group)
        sums = capture.capture_samples(losses, group, retain_graph)
        present = {group} if isinstance(group, str) else set(group)
        self._pending.record({name: sums[i] for i, name in enumerate(capture.names) if name in present})

    def backward_tasks(self, losses: Mapping[str, Tensor], *, retain_graph: bool | None = None) -> None:
        """One loss per group, as :meth:`backward`, without per-group gradients: ``opt.backward_tasks({...})``.

        One backward pass per loss (every one but the last retains the graph) asks only for the
        gradients at the outputs of the ``nn.Linear`` calls; the group Gram matrix and the update
        follow exactly from those and the calls' inputs (see :mod:`balancer.capture.layer_capture`). Tasks
        on a shared trunk share its inputs, so the trunk's cost does not grow with a copy per
        task. Same requirements as :meth:`backward_samples`.
        """
        capture = self._pending.layer_capture("backward_tasks")
        capture.capture_tasks(losses, retain_graph)
        self._pending.record({name: loss.detach().reshape(()).to(torch.float64) for name, loss in losses.items()})

    def backward_rows(
        self, loss: Tensor, *, at: Tensor, group: str | Sequence[str], retain_graph: bool | None = None
    ) -> None:
        """Groups that are rows of one forward pass: ``opt.backward_rows(loss, at=logp, group=row_groups)``.

        ``at``: one row per sample along dimension 0; ``group``: one name per row, or one for all. Per
        group present, one backward pass from ``at`` in ``opt.group(name)`` with the other groups' rows
        of ``d loss/d at`` zeroed: exact with any model. What does not flow through ``at`` is ungrouped.
        Calls accumulate. Semantics, cost in backward passes, limits: :mod:`balancer.capture.rows`.
        """
        rows = check_rows(self._pending, loss, at, group)
        self._check_graph_once([loss])
        capture_rows(self._pending, loss, at, rows, retain_graph)

    def _check_graph_once(self, losses: Iterable[Tensor]) -> None:
        """The first capture's graph is walked for trainable leaves the inner optimizer lacks."""
        if not self._graph_checked:
            check_graph_leaves(losses, self._backend.trained_parameters())
            self._graph_checked = True

    def tap(self, tensor: Tensor, group: str | Sequence[str], labels: Tensor | None = None) -> Tensor:
        """Returns ``tensor`` unchanged; its gradient is shown to the tap plugins (see :mod:`balancer.capture.taps`).

        Args:
            tensor: rows along dimension 0 (e.g. ``[B]`` log-probabilities, ``[B, C]`` logits).
            group: one group name for all rows, or one name per row.
            labels: optional tensor with one entry per row (class labels, pair ids), passed on.

        In the backward pass each tap plugin, in the user's order, may rescale the gradient
        rows and accumulate statistics, which are summed over ranks and folded into its state
        at ``step()``. Works inside and outside group blocks and across gradient accumulation.
        Without tap plugins the tensor is returned as is.
        """
        return self._pending.taps.tap(tensor, group, labels, lambda: self._plugin_states)

    def plugin_metrics(self) -> dict[str, dict[str, Any]]:
        """Each plugin's :meth:`~balancer.Plugin.metrics` of its current state, by plugin name."""
        return {p.name: p.metrics(self._plugin_states[p.name]) for p in self._plugins}

    # -- the step ----------------------------------------------------------------------------
    @property
    def _step_supports_amp_scaling(self) -> bool:
        show_scaler(self)  # GradScaler reads this right before it checks .grad: show it the groups
        return True

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Combines the group gradients with the plugins' weights (clipped if asked), then steps the
        inner optimizer. All or nothing: if anything raises, nothing of the step is kept."""
        return run_step(self, closure)

    def clip_grad_norm_(
        self, max_norm: float, norm_type: float | str = 2.0, error_if_nonfinite: bool = False, *, scaler: Any = None
    ) -> Tensor:
        """Clips the update of this step to ``max_norm``, like ``torch.nn.utils.clip_grad_norm_``.

        Call it where you would call torch's: after the last backward pass, before ``step()``.
        While groups are pending ``.grad`` does not hold the update (torch's call would see no
        gradient and clip nothing), so this plans the step now (statistics, plugins, weights),
        measures the norm of ``ungrouped + Σ_k w_k g_k`` (from the Gram matrix for the L2 norm)
        and ``step()`` applies the clipped update. With no group pending it clips ``.grad`` in
        place, exactly as torch does.

        Args:
            max_norm, norm_type, error_if_nonfinite: as in torch (``norm_type`` 2.0, p > 0 or "inf").
            scaler: the ``torch.amp.GradScaler`` whose ``scaler.step(opt)`` follows, if any: the
                norm is then of the unscaled update. Do not call ``scaler.unscale_(opt)`` with
                pending groups (it reaches only the ungrouped gradients).

        Returns:
            The total norm of the update before clipping, a 0-d float64 tensor (also
            ``last_stats.grad_norm`` after the step).
        """
        return clip_step(self, ClipRequest.make(max_norm, norm_type, error_if_nonfinite), scaler)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears ungrouped and pending group gradients (``.grad`` set to ``None`` by default)."""
        active = self._backend.active
        if active is not None:
            raise CaptureError(f"zero_grad() called inside group `{active}`. Call it outside group blocks.")
        self._pending.zero_grad(set_to_none)

    # -- checkpoints: the inner optimizer's state dict plus a "balancer" section ---------------
    def _save_state(self) -> dict[str, Any]:
        return make_state_dict(self)

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        load_state_dict(self, state_dict)  # the plugin list must match the saved one (checked first)

    def balancer_state_dict(self) -> dict[str, Any]:
        """The Balancer's own section alone (plugin names, versions, states, step count), for
        checkpoint formats that store the optimizer elsewhere (DeepSpeed's client state)."""
        return make_section(self)

    def load_balancer_state_dict(self, section: dict[str, Any] | None) -> None:
        """Restores a :meth:`balancer_state_dict`; the plugin list must match the saved one."""
        load_section(self, section)

    def __repr__(self) -> str:
        plugins = ", ".join(repr(p) for p in self._plugins)
        return f"Balancer(inner={type(self._inner).__name__}, plugins=[{plugins}])"
