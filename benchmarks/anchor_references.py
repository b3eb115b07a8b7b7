"""The first-step check of ``vs_anchors.py``: the gradient each method hands to Adam against a
reference update of the same definition (UPGrad: torchjd; MGDA: the exact min-norm point;
PCGrad: the closest of its projection orders; FairGrad and ConFIG: torchjd's aggregator on the
float64 gradients). GradNorm, whose weights change over steps, is checked over its first steps
in ``anchor_references_weighting.py``."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from anchor_catalog import AGGREGATORS, methods_of
from anchor_methods import Data, Key, Method, Net, SumStep, TorchjdStep, split_losses, torchjd_aggregator
from torch import Tensor


def relative_difference(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def task_rows(method: Method) -> tuple[Tensor, Tensor]:
    """The k group/task gradients of ``method``'s model as it is now, ``[k, n]``, and the k losses, in float64."""
    rows, values = [], []
    for loss in split_losses(method.net, method.data):
        grads = torch.autograd.grad(loss, method.params, retain_graph=True, allow_unused=True)
        flat = [torch.zeros(p.numel()) if g is None else g.flatten() for p, g in zip(method.params, grads, strict=True)]
        rows.append(torch.cat(flat))
        values.append(loss.detach())
    return torch.stack(rows).double(), torch.stack(values).double()


def first_rows(data: Data) -> Tensor:
    """The k group/task gradients of the initial model, ``[k, n]`` in float64."""
    return task_rows(SumStep(data, "-"))[0]


def torchjd_update(aggregator: str, rows: Tensor, aggregated: int) -> Tensor:
    """torchjd's aggregator on the float64 gradients: columns ``:aggregated`` aggregated, the others
    (the heads, where only the trunk is aggregated) the plain sum of the rows."""
    return torch.cat([torchjd_aggregator(aggregator)(rows[:, :aggregated]), rows[:, aggregated:].sum(0)])


def pcgrad_weights(gram: Tensor) -> Tensor:
    """PCGrad's weights (Yu et al. 2020, Algorithm 1) for every choice of projection orders, ``[C, k]``.

    Each g_i is projected off the g_j it conflicts with in a random order; the result depends on
    that order when g_i conflicts with two or more others, so a correct implementation matches one
    of these candidates, not a single reference.
    """
    k = gram.shape[0]
    per_row = []
    for i in range(k):
        options = []
        for order in itertools.permutations([j for j in range(k) if j != i]):
            w = torch.zeros(k, dtype=gram.dtype)
            w[i] = 1.0
            for j in order:
                inner = gram[j] @ w
                if inner < 0:
                    w[j] -= inner / gram[j, j]
            options.append(w)
        per_row.append(torch.stack(options))
    return torch.stack([sum(ws) for ws in itertools.product(*per_row)])


def mgda_weights(gram: Tensor) -> Tensor:
    """The exact MGDA weights (Désidéri 2012; Sener & Koltun 2018), ``[1, k]``: the minimum of
    ``wᵀ G w`` over the simplex, found by solving the KKT system on every support."""
    k = gram.shape[0]
    best, best_value = None, float("inf")
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            idx = list(support)
            kkt = torch.zeros(size + 1, size + 1, dtype=gram.dtype)
            kkt[:size, :size] = gram[idx][:, idx]
            kkt[:size, size] = kkt[size, :size] = 1.0
            rhs = torch.zeros(size + 1, dtype=gram.dtype)
            rhs[size] = 1.0
            solution = torch.linalg.lstsq(kkt, rhs.unsqueeze(1)).solution.squeeze(1)
            w = torch.zeros(k, dtype=gram.dtype)
            w[idx] = solution[:size]
            if (w >= -1e-12).all() and abs(float(w.sum()) - 1.0) < 1e-9 and float(w @ gram @ w) < best_value:
                best, best_value = w.clamp_min(0), float(w @ gram @ w)
    assert best is not None
    return best.unsqueeze(0)


def closest_difference(grad: Tensor, rows: Tensor, aggregated: int, candidates: Callable[[Tensor], Tensor]) -> float:
    """Relative L2 distance of ``grad`` to the closest reference update: columns ``:aggregated``
    are ``Σ_k w_k g_k`` for the candidate weights ``w``, the other columns (the heads, where only
    the trunk is aggregated) the plain sum of the rows. Computed from inner products only."""
    g, a = grad.double()[:aggregated], rows[:, :aggregated]
    gram = a @ a.T
    w = candidates(gram)
    squared = g @ g - 2 * w @ (a @ g) + ((w @ gram) * w).sum(1)
    rest = (grad.double()[aggregated:] - rows[:, aggregated:].sum(0)).square().sum()
    return float((squared.min().clamp_min(0) + rest).sqrt() / grad.double().norm())


def trunk_only(data: Data, method: str) -> bool:
    """Whether a method aggregates the trunk only (heads: torchjd mtl_backward, LibMTL)."""
    return data.scenario == "heads" and method in ("torchjd", "torchjd-gramopt", "libmtl")


def tolerance(aggregator: str, method: str) -> float:
    # torchjd's MGDA (Frank-Wolfe, stops once a step is < 1e-3) and LibMTL's MGDA (its own
    # projected iteration) stop early; every other method is exact up to float32 rounding.
    return 1e-2 if aggregator == "mgda" and not method.startswith("balancer") else 1e-4


def print_check(aggregator: str, method: str, reference: str, diff: float, tol: float) -> bool:
    print(f"  {aggregator:<8} {method:<16} vs {reference:<34} {diff:9.2e}   {verdict(diff <= tol)} (tol {tol:.0e})")
    return diff <= tol


def check(data: Data, methods: dict[Key, Method]) -> bool:
    """The first step's gradient of every method against a reference update of the same definition
    (all aggregators but GradNorm)."""
    rows = first_rows(data)
    gram = rows @ rows.T
    n_trunk = sum(p.numel() for p in Net(data.cfg, data.heads).trunk.parameters())
    conflicting = int((gram.triu(1) < 0).sum())
    print(f"check: first-step gradient handed to Adam, relative L2 difference; {conflicting} conflicting pairs")
    ok = True
    torchjd_refs: dict[tuple[str, int], Tensor] = {}
    for agg in (a for a in AGGREGATORS if a != "gradnorm" and (a, "balancer") in methods):
        grads = {m: methods[(agg, m)].first_gradient() for m in methods_of(agg, data.scenario)}
        if data.scenario == "heads" and agg == "upgrad":
            full = TorchjdStep(data, agg, all_params=True).first_gradient()
        for m, grad in grads.items():
            trunk = trunk_only(data, m)
            suffix = " (trunk)" if trunk else ""
            if agg == "upgrad" and m == "torchjd":
                continue
            if agg == "upgrad":
                ref = grads["torchjd"] if trunk or data.scenario == "groups" else full
                ref_name = "torchjd" if ref is grads["torchjd"] else "torchjd backward, all params"
                diff = relative_difference(grad, ref)
            elif agg in ("fairgrad", "config"):
                aggregated = n_trunk if trunk else rows.shape[1]
                if (agg, aggregated) not in torchjd_refs:
                    torchjd_refs[(agg, aggregated)] = torchjd_update(agg, rows, aggregated)
                ref_name = "torchjd, float64 gradients" + suffix
                diff = relative_difference(grad, torchjd_refs[(agg, aggregated)])
            else:
                exact = mgda_weights if agg == "mgda" else pcgrad_weights
                ref_name = ("exact MGDA" if agg == "mgda" else "PCGrad, closest order") + suffix
                diff = closest_difference(grad, rows, n_trunk if trunk else rows.shape[1], exact)
            ok &= print_check(agg, m, ref_name, diff, tolerance(agg, m))
    return ok


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"
