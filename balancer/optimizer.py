"""``Balancer``: a ``torch.optim.Optimizer`` that reweights group gradients, then lets the
wrapped optimizer step.

One step, as data flows::

    with opt.group(name): loss.backward()   # grads land in group rows (views, no copy)
    opt.step():  G = A Aᵀ  ->  w = p_n(... p_1(stats, 1) ...)  ->  clip  ->  grad = ungrouped + Aᵀ w  ->  inner.step()

The step is planned first (:mod:`balancer._step`: statistics, plugins, clip, nothing written),
then applied and committed only if the inner step succeeds: a step is all or nothing.

Gradients produced outside every group block are added to the update as they are (weight 1).
A group that receives no gradient in a step is simply absent: plugins see only the groups
present, its weight is not computed, and its plugin state (e.g. an EMA) is left untouched.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from balancer._checkpoint_section import load_balancer_section, make_balancer_section
from balancer._checks import check_graph_leaves, check_group_name, check_loss, check_model_params
from balancer._clip import ClipRequest, check_clip, clip_in_place, has_update_norm
from balancer._copy import copy_state
from balancer._step import StepPlan, check_plan, check_token, clip_route, measure, measured_clip, plan_step
from balancer.capture.layer_capture import LayerCapture
from balancer.capture.local import LocalBackend
from balancer.capture.taps import TapHub
from balancer.config import BalancerConfig, NonFinitePolicy, build_plugins, resolve_config
from balancer.contract.backend import Backend
from balancer.contract.plugin import InvalidStateError, Plugin, State, check_state_types
from balancer.contract.registry import Registry, default_registry
from balancer.contract.stats import GroupStats
from balancer.errors import CaptureError, PluginError

__all__ = ["Balancer"]

_HOOK_REGISTRIES = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


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


class Balancer(torch.optim.Optimizer):
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
        if on_nonfinite not in ("zero", "raise"):
            raise ValueError(f"`on_nonfinite` must be 'zero' or 'raise'. Found `on_nonfinite = {on_nonfinite!r}`.")
        if max_grad_norm is None and norm_type not in (2, 2.0):
            raise ValueError(
                f"`norm_type = {norm_type!r}` without `max_grad_norm` would be ignored: set max_grad_norm too."
            )
        self._clip = None if max_grad_norm is None else ClipRequest.make(max_grad_norm, norm_type)
        self._plugins: tuple[Plugin, ...] = tuple(build_plugins(plugins, registry))
        self._backend: Backend = backend if backend is not None else _select_backend(inner, registry)
        self._inner = self._backend.optimizer
        if self._clip is not None:
            check_clip(self._backend, self._clip, "max_grad_norm")
        if model is not None:
            check_model_params(model, self._backend.trained_parameters())
        self._plugin_states: dict[str, State] = {p.name: p.init() for p in self._plugins}
        self._taps = TapHub(self._plugins)
        self.on_nonfinite: NonFinitePolicy = on_nonfinite
        self.last_stats: GroupStats | None = None
        self._step_count = 0
        self._rows_seen = 0  # the most groups seen in one step
        self._losses: dict[str, Tensor] = {}
        self._captures: dict[str, int] = {}
        self._graph_checked = False
        self._measured: tuple[Tensor, bool, bool] | None = None  # this step's Gram (see _step.measure)
        self._plan: StepPlan | None = None  # this step, planned early by clip_grad_norm_
        self._dropped: set[str] = set()  # non-finite groups of this step (their rows were zeroed)
        self._warned: set[str] = set()  # warnings already shown (once per Balancer)
        self._layers = LayerCapture(model, self._backend) if model is not None else None
        self._init_optimizer_machinery()
        self._backend.attach(self)

    @classmethod
    def from_config(
        cls, inner: torch.optim.Optimizer, config: BalancerConfig | Mapping[str, Any] | str, **kwargs: Any
    ) -> Balancer:
        """Builds a Balancer from a config dict, a JSON file path or a :class:`BalancerConfig`."""
        cfg, plugins = resolve_config(config, kwargs.get("registry"))
        return cls(inner, plugins, **cfg.balancer_kwargs(), **kwargs)

    def _init_optimizer_machinery(self) -> None:
        # What Optimizer.__init__ sets up, without taking ownership of the parameters.
        for attr in _HOOK_REGISTRIES:
            if attr not in self.__dict__:
                setattr(self, attr, OrderedDict())
        self._patch_step_function()

    # -- forwarding: properties with setters, never aliased copies ---------------------------
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._inner.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self._inner.state

    @state.setter
    def state(self, value: Any) -> None:
        self._inner.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self._inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._inner.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._inner.add_param_group(param_group)

    @property
    def inner(self) -> torch.optim.Optimizer:
        """The wrapped optimizer."""
        return self._inner

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
        plugin = next((p for p in self._plugins if p.name == name), None)
        if plugin is None:
            raise KeyError(
                f"update_plugin_state: no plugin named {name!r}; this Balancer has {[p.name for p in self._plugins]}."
            )
        new = change(copy_state(self._plugin_states[name]))
        try:
            check_state_types(new)
            plugin.check_state(new)
        except (InvalidStateError, ValueError, TypeError) as exc:
            raise PluginError(
                f"update_plugin_state({name!r}): plugin `{name}` refuses the new state: {exc}. State left as it was."
            ) from None
        self._plugin_states[name] = new

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def max_grad_norm(self) -> float | None:
        """The norm every step clips the update to (``None``: no clipping at step time)."""
        return None if self._clip is None else self._clip.max_norm

    def _source(self) -> Backend:
        """Where this step's groups live: the backend, or a pending layer capture (``backward_samples/_tasks``)."""
        layers = self._layers
        return layers if layers is not None and layers.names else self._backend

    # -- AMP ---------------------------------------------------------------------------------
    @property
    def _step_supports_amp_scaling(self) -> bool:
        # GradScaler.step reads this flag right before it checks `.grad` for inf/NaN. Group
        # gradients sit in their rows, not in `.grad`, so this is the moment to let the scaler
        # see them: the ungrouped grads go to `.grad` and, if any group is non-finite, a NaN is
        # planted there (no host sync) so that the scaler skips the step and backs off. The
        # scaler then passes `grad_scale`; step() folds 1/scale into the combination.
        source = self._source()
        k = len(source.names)
        if k and source.active is None:
            plan = self._plan
            if plan is not None:  # clip_grad_norm_(scaler=...) planned the step
                check_token(self, plan, source)
                poison = plan.skip
            else:  # no host sync here: a Gram row that is not finite makes the scaler skip and back off
                gram, _ = measure(self, source, clip_route(source, measured_clip(self, self._clip), k) == "gram")
                dropped = any(name in self._dropped for name in source.names)
                poison = (~torch.isfinite(gram.diagonal()[:k]).all()) | dropped
            if plan is None or not plan.combined:
                source.expose_ungrouped(torch.as_tensor(poison, device=source.stats_device))
        return True

    # -- capture -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def group(self, name: str) -> Iterator[None]:
        """Gradients from backward passes inside this block belong to group ``name``."""
        check_group_name(name)
        active = self._backend.active
        if active is not None:
            raise CaptureError(
                f"Cannot enter group `{name}` inside group `{active}`: group blocks do not nest. "
                "Close the first block before opening the next."
            )
        self._new_capture(f"opt.group({name!r})")
        self._source().enter(name)
        self._captures[name] = self._captures.get(name, 0) + 1
        try:
            yield
        finally:
            self._backend.exit()

    def backward(self, losses: Mapping[str, Tensor], *, retain_graph: bool | None = None) -> None:
        """Runs one backward pass per group: ``opt.backward({"math": l1, "code": l2})``.

        Losses may share a graph: every backward but the last retains it. The loss values are
        recorded for the plugins (``stats.losses``).
        """
        if not isinstance(losses, Mapping) or not losses:
            raise CaptureError(f"backward() takes a non-empty dict {{group name: scalar loss}}. Found `{losses!r}`.")
        for name, loss in losses.items():
            check_group_name(name)
            check_loss(name, loss)
        if not self._graph_checked:
            check_graph_leaves(losses.values(), self._backend.trained_parameters())
            self._graph_checked = True
        items = list(losses.items())
        for i, (name, loss) in enumerate(items):
            with self.group(name):
                keep = True if i < len(items) - 1 else retain_graph
                self._backend.backward(loss, retain_graph=keep)
            self._add_loss(name, loss.detach().reshape(()).to(torch.float64))

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
        capture = self._layer_capture("backward_samples")
        group = group if isinstance(group, str) else list(group)
        sums = capture.capture_samples(losses, group, retain_graph)
        present = {group} if isinstance(group, str) else set(group)
        self._record({name: sums[i] for i, name in enumerate(capture.names) if name in present})

    def backward_tasks(self, losses: Mapping[str, Tensor], *, retain_graph: bool | None = None) -> None:
        """One loss per group, as :meth:`backward`, without per-group gradients: ``opt.backward_tasks({...})``.

        One backward pass per loss (every one but the last retains the graph) asks only for the
        gradients at the outputs of the ``nn.Linear`` calls; the group Gram matrix and the update
        follow exactly from those and the calls' inputs (see :mod:`balancer.capture.layer_capture`). Tasks
        on a shared trunk share its inputs, so the trunk's cost does not grow with a copy per
        task. Same requirements as :meth:`backward_samples`.
        """
        capture = self._layer_capture("backward_tasks")
        capture.capture_tasks(losses, retain_graph)
        self._record({name: loss.detach().reshape(()).to(torch.float64) for name, loss in losses.items()})

    def _layer_capture(self, method: str) -> LayerCapture:
        if self._layers is None:
            raise CaptureError(f"{method} needs the model: build the Balancer with `model=model`.")
        if self._backend.names:
            raise CaptureError(
                f"{method} cannot be mixed with `opt.group`/`opt.backward` in one step (groups "
                f"{list(self._backend.names)} are pending). Call step() or zero_grad() first."
            )
        self._new_capture(method)
        return self._layers

    def _new_capture(self, what: str) -> None:
        """A capture starts: the step's measured statistics are stale; after clip_grad_norm_ it is refused."""
        if self._plan is not None:
            raise CaptureError(
                f"{what} after opt.clip_grad_norm_() in the same step: the norm was measured without these "
                "gradients. Clip after the last backward pass of the step, right before step()."
            )
        self._measured = None

    def _record(self, losses: Mapping[str, Tensor]) -> None:
        """Adds this capture's loss values to the step's, and counts one backward call per group."""
        for name, value in losses.items():
            self._add_loss(name, value)
            self._captures[name] = self._captures.get(name, 0) + 1

    def _add_loss(self, name: str, value: Tensor) -> None:
        self._losses[name] = self._losses[name] + value if name in self._losses else value

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
        return self._taps.tap(tensor, group, labels, lambda: self._plugin_states)

    def plugin_metrics(self) -> dict[str, dict[str, Any]]:
        """Each plugin's :meth:`~balancer.Plugin.metrics` of its current state, by plugin name."""
        return {p.name: p.metrics(self._plugin_states[p.name]) for p in self._plugins}

    # -- the step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Combines the group gradients with the plugins' weights (clipped if asked), then steps the
        inner optimizer. All or nothing: if anything raises, nothing of the step is kept."""
        active = self._backend.active
        if active is not None:
            raise CaptureError(f"step() called inside group `{active}`. Call it after the group block.")
        if closure is not None and self._clip is not None:
            raise CaptureError(
                f"step(closure) with max_grad_norm={self._clip.max_norm}: the closure's gradients are computed inside "
                "the inner optimizer's step, where the Balancer cannot clip them. Clip inside the closure instead, "
                "after its backward pass: `opt.clip_grad_norm_(max_norm)` (it clips .grad there, as torch does)."
            )
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        source = self._source()
        if found_inf is not None and grad_scale is None and source.names:
            raise CaptureError(
                "scaler.unscale_(opt) was called before scaler.step(opt): it unscales only the ungrouped "
                "gradients. Call scaler.step(opt) directly (the Balancer unscales group gradients itself); to "
                "clip, use Balancer(..., max_grad_norm=c) or opt.clip_grad_norm_(c, scaler=scaler) instead."
            )
        plan = self._plan
        if plan is None:
            plan = plan_step(self, self._clip, grad_scale, found_inf)
        else:
            check_plan(self, plan, source, grad_scale, found_inf)
        if plan.skip:
            source.revert()
            self._taps.discard()
            self._plan, self._measured = None, None
            return None  # AMP overflow: skip, plugin state untouched; the scaler backs off
        try:
            if not plan.combined:
                weights = plan.weights
                if weights is None:
                    weights = torch.zeros(0, dtype=torch.float64, device=source.stats_device)
                source.combine(weights, scale=plan.factor)
            if closure is not None:
                with torch.enable_grad():
                    result = self._backend.optimizer_step(closure)
            else:
                result = self._backend.optimizer_step()
        except BaseException:
            source.revert()
            self._plan, self._measured = None, None
            raise
        self._commit(plan)
        return result

    def _commit(self, plan: StepPlan) -> None:
        self._plugin_states = plan.states
        self.last_stats = plan.stats
        self._rows_seen = max(self._rows_seen, len(plan.names))
        self._backend.end_step()
        if self._layers is not None:
            self._layers.end_step()
        self._forget_step()
        self._step_count += 1

    def _forget_step(self) -> None:
        self._taps.discard()
        self._losses.clear()
        self._captures.clear()
        self._dropped.clear()
        self._plan, self._measured = None, None

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
        request = ClipRequest.make(max_norm, norm_type, error_if_nonfinite)
        if self._backend.active is not None:
            raise CaptureError(f"clip_grad_norm_() called inside group `{self._backend.active}`: call it after.")
        if self._clip is not None:
            raise CaptureError(
                f"This Balancer already clips every step to max_grad_norm={self._clip.max_norm}; calling "
                "clip_grad_norm_ as well would clip twice. Use one of them."
            )
        check_clip(self._backend, request, "clip_grad_norm_")
        if self._plan is not None:
            raise CaptureError("clip_grad_norm_() was already called in this step; call it once, before step().")
        source = self._source()
        scale = 1.0 / float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None
        if not source.names and has_update_norm(source):  # nothing grouped: clip .grad as torch does
            return clip_in_place(source, request, 1.0 if scale is None else scale)
        grad_scale = None if scale is None else torch.tensor(1.0 / scale, dtype=torch.float64)
        self._plan = plan_step(self, request, grad_scale, None)
        self._plan.token = source.capture_token()
        if self._plan.grad_norm is None:  # AMP: a non-finite group; scaler.step(opt) will skip the step
            return torch.tensor(float("inf"), dtype=torch.float64, device=source.stats_device)
        return self._plan.grad_norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears ungrouped and pending group gradients (``.grad`` set to ``None`` by default)."""
        active = self._backend.active
        if active is not None:
            raise CaptureError(f"zero_grad() called inside group `{active}`. Call it outside group blocks.")
        self._backend.zero_grad(set_to_none)
        if self._layers is not None:
            self._layers.zero_grad(set_to_none)
        self._forget_step()

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus a ``"balancer"`` section with every plugin's state."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self._inner.state_dict()
        sd["balancer"] = self.balancer_state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a :meth:`state_dict`; the plugin list must match the saved one."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        section = state_dict.get("balancer")
        states, step = load_balancer_section(section, self._plugins, self._backend.stats_device)  # refuse first
        self._inner.load_state_dict({k: v for k, v in state_dict.items() if k != "balancer"})
        self._restore(states, step, section)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def balancer_state_dict(self) -> dict[str, Any]:
        """The Balancer's own section alone (plugin names, versions, states, step count), for
        checkpoint formats that store the optimizer elsewhere (DeepSpeed's client state)."""
        return make_balancer_section(self._plugins, self._plugin_states, self._step_count, self._rows_seen)

    def load_balancer_state_dict(self, section: dict[str, Any] | None) -> None:
        """Restores a :meth:`balancer_state_dict`; the plugin list must match the saved one."""
        self._restore(*load_balancer_section(section, self._plugins, self._backend.stats_device), section)

    def _restore(self, states: dict[str, State], step: int, section: dict[str, Any] | None) -> None:
        self._plugin_states.update(states)
        self._step_count = step
        # The rows of a long run live in one merged block; reserving it now makes the first
        # steps after a resume sum in the same order as the uninterrupted run (bit-exact resume).
        self._rows_seen = int(section.get("rows", 0)) if isinstance(section, dict) else 0
        self._backend.reserve_rows(self._rows_seen)

    # -- pickling, printing ------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in _HOOK_REGISTRIES}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_optimizer_machinery()

    def __repr__(self) -> str:
        plugins = ", ".join(repr(p) for p in self._plugins)
        return f"Balancer(inner={type(self._inner).__name__}, plugins=[{plugins}])"
