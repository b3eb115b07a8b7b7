"""The GradNorm check of ``vs_anchors.py``: each method's first steps against GradNorm in float64.

GradNorm's weights change only through their own update, so one step says little: every method
(the Balancer's paths, LibMTL) takes ``STEPS`` steps from its fresh model, and before each step
its k task gradients and losses are recomputed in float64 from its current parameters. The
reference (``gradnorm_reference``) replays GradNorm on those: step 1 is the plain sum and
records ``L_i(0)``, step 2 is the first update of the weights (still 1 in that step's update), step
3 the first update of the model with learned weights. Compared, as the largest relative L2
difference over the steps: the gradient handed to Adam, and the weights after each of their
updates as ``Δw = w - 1`` (the first Adam step moves each ``s_i`` by about ``±lr``, so it checks
the signs of ``∂L_grad/∂s``; the later ones, Adam's moments, check their sizes too).

Definitions differ in what the norms ``‖g_i‖`` cover, and each method is compared with its own:
LibMTL (``rep_grad=False``) takes the shared parameters, i.e. every parameter in ``groups`` and
the trunk in ``heads``, where it weights the trunk's gradients only and leaves the heads their
plain task gradients (``(trunk)`` below). The Balancer's ``gradnorm`` reads the norms off the Gram
matrix of the captured groups, i.e. every parameter, heads included, and weights all of them.
"""

from __future__ import annotations

import torch
from anchor_catalog import methods_of
from anchor_methods import GRADNORM_ALPHA, LR, Data, Key, Method, Net
from anchor_methods_weighting import LibmtlGradNormStep
from anchor_references import print_check, relative_difference, task_rows, trunk_only
from torch import Tensor

STEPS = 5
TOLERANCE = 1e-4  # float32 gradients against float64; nothing is solved iteratively
# LibMTL keeps s in float32 starting at 1, so s = 1 ± lr after a step is rounded by up to 6e-8 of a change of lr
# (1e-3): about 1e-4 of Δw; the Balancer keeps s in float64
LIBMTL_WEIGHT_TOLERANCE = 1e-3


def gradnorm_reference(steps: list[tuple[Tensor, Tensor]], aggregated: int) -> tuple[list[Tensor], list[Tensor]]:
    """GradNorm (Chen et al., ICML 2018) with LibMTL 1.1.5's parametrization, in float64.

    ``steps``: per step the ``[k, n]`` task gradients and the k losses. Weights ``w = K softmax(s)``
    with ``s = 0`` at first; at each step after the first, with ``G_i = ‖w_i g_i‖`` over columns
    ``:aggregated``, ``r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))`` and ``L_i(0)`` the first
    step's losses, ``s`` takes one ``torch.optim.Adam(lr=LR)`` step on
    ``Σ_i |G_i - mean_j(G_j) r_i^α|`` with the target ``mean_j(G_j) r_i^α`` held constant. The
    update of each step is ``Σ_i w_i g_i`` over columns ``:aggregated`` with the weights before that
    step's learning, plus the plain sum of the other columns. Returns the updates and the weights
    after each update of the weights (steps 2, 3, ...).
    """
    k = steps[0][0].shape[0]
    s = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([s], lr=LR)
    updates: list[Tensor] = []
    initial: Tensor | None = None
    learned: list[Tensor] = []
    for rows, losses in steps:
        shared = rows[:, :aggregated]
        weights = k * torch.softmax(s, dim=0)
        updates.append(torch.cat([weights.detach() @ shared, rows[:, aggregated:].sum(0)]))
        if initial is None:
            initial = losses
            continue
        norms = torch.linalg.vector_norm(weights[:, None] * shared, dim=1)  # G_i
        ratio = losses / initial
        target = (norms.mean() * (ratio / ratio.mean()) ** GRADNORM_ALPHA).detach()
        adam.zero_grad()
        (norms - target).abs().sum().backward()
        adam.step()
        learned.append(k * torch.softmax(s.detach(), dim=0))
    return updates, learned


def learned_weights(method: Method) -> Tensor:
    """The weights the method will use at its next step."""
    if isinstance(method, LibmtlGradNormStep):
        return method.learned_weights().double()
    metrics = method.opt.plugin_metrics()["gradnorm"]  # type: ignore[attr-defined]
    return torch.stack([metrics[name] for name in sorted(metrics)]).double()  # "w/g0", "w/g1", ...


def check_gradnorm(data: Data, methods: dict[Key, Method]) -> bool:
    """GradNorm's first ``STEPS`` steps of every method against ``gradnorm_reference`` (if it runs)."""
    if ("gradnorm", "balancer") not in methods:
        return True
    n_trunk = sum(p.numel() for p in Net(data.cfg, data.heads).trunk.parameters())
    print(f"check: GradNorm's first {STEPS} steps (alpha {GRADNORM_ALPHA}, lr {LR}), float64 reference")
    ok = True
    for m in methods_of("gradnorm", data.scenario):
        method = methods[("gradnorm", m)]
        seen, grads, weights = [], [], []
        for step in range(STEPS):
            seen.append(task_rows(method))
            grads.append(method.first_gradient())
            if step >= 1:  # the weights after their update in this step
                weights.append(learned_weights(method))
        trunk = trunk_only(data, m)
        updates, reference = gradnorm_reference(seen, n_trunk if trunk else seen[0][0].shape[1])
        suffix = " (trunk)" if trunk else ""
        diff = max(relative_difference(g, u) for g, u in zip(grads, updates, strict=True))
        ok &= print_check("gradnorm", m, f"GradNorm f64, update 1-{STEPS}{suffix}", diff, TOLERANCE)
        diff = max(relative_difference(w - 1.0, r - 1.0) for w, r in zip(weights, reference, strict=True))
        tol = LIBMTL_WEIGHT_TOLERANCE if m == "libmtl" else TOLERANCE
        ok &= print_check("gradnorm", m, f"GradNorm f64, Δw 2-{STEPS}{suffix}", diff, tol)
    return ok
