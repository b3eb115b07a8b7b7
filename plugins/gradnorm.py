"""``gradnorm``: GradNorm (Chen et al., ICML 2018), learned task weights from the Gram matrix and the losses."""

from __future__ import annotations

from typing import Literal, TypedDict

import torch
from pydantic import Field
from torch import Tensor

from balancer import GroupStats, PluginOptions
from balancer.contract.weighting import GramWeighting

from ._adam import StepRule, descend
from ._named import NamedIndex, check_named_state, check_nonnegative

__all__ = ["GradNorm", "GradNormOptions", "GradNormState"]


class GradNormOptions(PluginOptions):
    """Options of :class:`GradNorm`."""

    alpha: float = Field(
        1.5, ge=0.0, description="Strength of the pull towards a common training rate (paper: 0.12 to 3; LibMTL 1.5)."
    )
    lr: float = Field(1e-4, gt=0.0, description="Learning rate of the weights' own step (LibMTL: the model's Adam).")
    optimizer: StepRule = Field("adam", description="Step on the weight parameters: Adam, or plain gradient descent.")
    parametrization: Literal["softmax", "direct"] = Field(
        "softmax",
        description="softmax: w = K softmax(s), s learned (LibMTL); direct: w learned, clamped at 0 and renormalised "
        "to sum K after each step (the paper).",
    )


class GradNormState(TypedDict):
    """State of :class:`GradNorm`: one entry per group seen, over ``names``."""

    names: list[str]  # every group seen so far, in order of first appearance
    params: Tensor  # [m] s (softmax) or w (direct)
    initial_loss: Tensor  # [m] L_i(0), the first recorded loss; NaN before one is recorded
    exp_avg: Tensor  # [m] Adam's first moment
    exp_avg_sq: Tensor  # [m] Adam's second moment
    steps: Tensor  # [m] Adam's step count


class GradNorm(GramWeighting[GradNormState]):
    """Learns task weights that give each group a gradient norm matched to its training rate (Chen et al. 2018).

    Chen, Badrinarayanan, Lee, Rabinovich, *GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks*, ICML 2018. With weights ``w_i``, group gradients ``g_i``
    and first losses ``L_i(0)``::

        G_i = w_i ‖g_i‖,   Ḡ = mean_i G_i,   L̃_i = L_i / L_i(0),   r_i = L̃_i / mean_j L̃_j
        L_grad = Σ_i | G_i - Ḡ r_i^α |          (Ḡ r_i^α held constant)

    and the weights descend ``L_grad``: a group that trains slowly (large ``r_i``) is pulled
    towards a larger gradient norm. The update of the model is ``Σ_i w_i g_i`` with the weights
    before their step. The norms ``‖g_i‖`` come from the Gram matrix's diagonal, so GradNorm costs
    nothing beyond the Balancer's Gram; they cover all captured parameters, where the paper takes
    the last shared layer (capture only that layer's groups to follow it).

    ``parametrization="softmax"`` (default) learns ``s`` with ``w = K softmax(s)``, as LibMTL 1.1.5's
    ``GradNorm`` does, so the weights stay positive and sum to ``K``; ``∂L_grad/∂s`` goes through the
    softmax's Jacobian. ``"direct"`` learns ``w`` as in the paper and renormalises it to sum ``K``
    after each step, clamping negative weights to 0 first (the paper does not say what to do with
    them). Each takes its own step (``optimizer``, ``lr``) in the plugin state; nothing is added to
    the user's optimizer.

    First steps: ``L_i(0)`` is the first loss recorded for group ``i`` (LibMTL takes the first
    epoch's average and weighs that epoch equally); until every group of the step has one from an
    earlier step, the weights are not updated (with a fresh state they are all 1). A group whose
    loss is unknown this step (``nan``; the Balancer warns once, ``needs_losses``) makes the step
    skip the learning, as a loss ratio cannot be formed; its weight is kept. State is keyed by
    ``names``; a new group starts with ``s_i`` at the mean of the others' (softmax) or ``w_i = 1``
    (direct), and the weights of the step's groups are renormalised to sum ``K``. With incoming
    weights ``w`` the plugin returns ``w * a``.

    Example::

        opt = Balancer(torch.optim.Adam(model.parameters(), lr=1e-4), plugins=[("gradnorm", {"alpha": 1.5})])
        opt.backward({"depth": loss_depth, "segmentation": loss_seg})
    """

    name = "gradnorm"
    Options = GradNormOptions
    options: GradNormOptions
    needs_losses = True
    nonfinite_state = {"initial_loss": "nan"}  # NaN: no loss recorded yet for that group

    def init(self) -> GradNormState:
        empty = torch.zeros(0, dtype=torch.float64)
        return GradNormState(
            names=[], params=empty, initial_loss=empty.clone(), exp_avg=empty.clone(), exp_avg_sq=empty.clone(),
            steps=empty.clone(),
        )  # fmt: skip

    def check_state(self, state: GradNormState) -> None:
        """One entry per stored name; Adam's second moments and step counts are not negative."""
        super().check_state(state)
        check_named_state(state, vectors=("params", "initial_loss", "exp_avg", "exp_avg_sq", "steps"))
        check_nonnegative(state["exp_avg_sq"], "exp_avg_sq")
        check_nonnegative(state["steps"], "steps")

    def _weights(self, params: Tensor) -> Tensor:
        k = params.shape[0]
        if self.options.parametrization == "softmax":
            return k * torch.softmax(params, dim=0)
        total = params.sum()
        return torch.where(total > 0, k * params / torch.where(total > 0, total, 1.0), torch.ones_like(params))

    def weigh(self, stats: GroupStats, state: GradNormState) -> tuple[Tensor, GradNormState]:
        opts = self.options
        device = stats.gram.device
        named = NamedIndex(state["names"], stats.names, device)
        softmax = opts.parametrization == "softmax"
        full = {
            "params": named.vector(state["params"], float("nan"), device),
            "initial_loss": named.vector(state["initial_loss"], float("nan"), device),
            **{key: named.vector(state[key], 0.0, device) for key in ("exp_avg", "exp_avg_sq", "steps")},
        }
        now = {key: named.take(value) for key, value in full.items()}
        params = now["params"]  # a new group: the mean of the others' s (softmax), or w = 1 (direct)
        fill = torch.nan_to_num(torch.nanmean(params), nan=0.0) if softmax else torch.ones_like(params)
        params = torch.where(torch.isnan(params), fill, params)
        weights = self._weights(params)

        losses, initial = stats.losses.to(torch.float64), now["initial_loss"]
        learn = (torch.isfinite(losses) & torch.isfinite(initial) & (initial != 0)).all()
        ratio = torch.where(learn, losses / torch.where(initial != 0, initial, 1.0), 1.0)
        rate = (ratio / ratio.mean()).clamp_min(0.0)
        norms = stats.gram.diagonal().clamp_min(0.0).sqrt()
        g = weights * norms
        v = torch.sign(g - g.mean() * rate**opts.alpha) * norms  # ∂L_grad/∂w, the target held constant
        if softmax:  # through w = K softmax(s)
            z = torch.softmax(params, dim=0)
            v = weights.shape[0] * z * (v - (z * v).sum())
        stepped, *moments = descend(
            opts.optimizer, opts.lr, params, torch.where(learn, v, 0.0), now["exp_avg"], now["exp_avg_sq"], now["steps"]
        )
        if not softmax:  # the paper: renormalise to sum K (negative weights clamped to 0 first)
            stepped = self._weights(stepped.clamp_min(0.0))
        new = {"params": named.put(full["params"], torch.where(learn, stepped, params))}
        for key, value in zip(("exp_avg", "exp_avg_sq", "steps"), moments, strict=True):
            new[key] = named.put(full[key], torch.where(learn, value, now[key]))
        first = torch.isnan(initial) & torch.isfinite(losses)
        new["initial_loss"] = named.put(full["initial_loss"], torch.where(first, losses, initial))
        return weights, GradNormState(names=named.names, **new)  # type: ignore[typeddict-item]

    def metrics(self, state: GradNormState) -> dict[str, object]:
        """The learned weights of every group seen (over all of them), by name."""
        if not state["names"]:
            return {}
        weights = self._weights(state["params"])
        return {f"w/{name}": weights[i] for i, name in enumerate(state["names"])}
