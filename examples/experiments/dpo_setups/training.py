"""One method's DPO run on a task, the DPO split check, and the matched-KL comparison.

Every method gets the same seeds, start, batches and optimizer (Adam); plain DPO is the Balancer
without plugins on :func:`balancer.recipes.dpo.dpo_group_losses`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from balancer import Balancer
from balancer.recipes.dpo import dpo_group_losses, dpo_loss, tap_pairs

CLIP = 2.0  # the prob rule's C (the plugin's default)
METHODS: dict[str, list[Any]] = {
    "dpo": [],
    "norm": [("balanced_dpo", {"rule": "norm"})],
    "prob_chosen": [("balanced_dpo", {"rule": "prob", "side": "chosen", "clip": CLIP})],
    "prob_chosen_floor": [("balanced_dpo", {"rule": "prob", "side": "chosen", "clip": CLIP, "floor": 1 / CLIP})],
    "prob_rejected": [("balanced_dpo", {"rule": "prob", "side": "rejected", "clip": CLIP})],
}
LABELS = {
    "dpo": "DPO",
    "norm": "`norm`",
    "prob_chosen": "`prob`, side chosen",
    "prob_chosen_floor": "`prob`, side chosen, floor 1/C",
    "prob_rejected": "`prob`, side rejected",
}


class Task(Protocol):
    """A DPO problem: trainable parameters, pair log-probs for a batch, metrics of the policy."""

    beta: float
    params: list[Tensor]
    ref_w: Tensor
    ref_l: Tensor

    def pair_logps(self, idx: Tensor) -> tuple[Tensor, Tensor]: ...

    def evaluate(self, step: int = 0) -> dict[str, float]: ...


def train(task: Task, method: str, steps: int, batch: int, lr: float, eval_every: int, seed: int) -> dict[str, Any]:
    """Trains ``task`` from its current parameters with one method; returns curves and gradient statistics."""
    opt = Balancer(torch.optim.Adam(task.params, lr=lr), plugins=METHODS[method])
    order = torch.Generator().manual_seed(seed + 1)  # the same batches for every method
    n_pairs = task.ref_w.shape[0]
    curves: dict[str, list[float]] = {"step": []}
    grads: dict[str, list[float]] = {}

    def record(step: int) -> None:
        curves["step"].append(step)
        for key, value in task.evaluate(step).items():
            curves.setdefault(key, []).append(value)

    for step in range(steps):
        if step % eval_every == 0:
            record(step)
        idx = torch.randint(n_pairs, (batch,), generator=order)
        raw_w, raw_l = task.pair_logps(idx)
        logp_w, logp_l = tap_pairs(opt, raw_w, raw_l)
        arriving = _watch({"pre_w": logp_w, "pre_l": logp_l, "post_w": raw_w, "post_l": raw_l})
        opt.backward(dpo_group_losses(logp_w, logp_l, task.ref_w[idx], task.ref_l[idx], beta=task.beta))
        opt.step()
        opt.zero_grad()
        stats = opt.last_stats
        for side, s in (("chosen", "w"), ("rejected", "l")):
            i = stats.names.index(side)
            grads.setdefault(f"{side}_norm", []).append(stats.norms[i].item())
            grads.setdefault(f"{side}_weight", []).append(stats.weights[i].item())
            # what the taps did to each pair's gradient: (after the tap) / (arriving at the tap)
            pre, post = arriving[f"pre_{s}"], arriving[f"post_{s}"]
            factor = (post / pre)[pre != 0]
            grads.setdefault(f"{side}_factor_min", []).append(factor.min().item())
            grads.setdefault(f"{side}_factor_max", []).append(factor.max().item())
    record(steps)
    final = {key: values[-1] for key, values in curves.items() if key != "step"}
    final["delta_logp_chosen"] = curves["logp_chosen"][-1] - curves["logp_chosen"][0]
    final["delta_logp_rejected"] = curves["logp_rejected"][-1] - curves["logp_rejected"][0]
    norm_w, norm_l = torch.tensor(grads["chosen_norm"]), torch.tensor(grads["rejected_norm"])
    weight_w, weight_l = torch.tensor(grads["chosen_weight"]), torch.tensor(grads["rejected_weight"])
    final["grad_ratio_raw"] = (norm_l / norm_w).mean().item()
    final["grad_ratio_applied"] = (weight_l * norm_l / (weight_w * norm_w)).mean().item()
    for side in ("chosen", "rejected"):
        final[f"{side}_factor_min"] = min(grads[f"{side}_factor_min"])
        final[f"{side}_factor_max"] = max(grads[f"{side}_factor_max"])
    return {"seed": seed, "method": method, "final": final, "curves": curves, "grads": grads}


def _watch(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sums, over the backward passes, the gradient arriving at each tensor (filled in by hooks)."""
    seen: dict[str, Tensor] = {}

    def hook(name: str) -> Callable[[Tensor], None]:
        def add(grad: Tensor) -> None:
            seen[name] = seen[name] + grad.detach() if name in seen else grad.detach().clone()

        return add

    for name, tensor in tensors.items():
        tensor.register_hook(hook(name))
    return seen


def check_split(task: Task, seed: int, rtol: float) -> dict[str, Any]:
    """The plain Balancer's update on ``dpo_group_losses`` equals the ``dpo_loss`` gradient.

    One SGD step with lr 1 on the parameters (restored afterwards): ``before − after`` is the
    combined gradient.
    """
    gen = torch.Generator().manual_seed(seed)
    start = [p.detach().clone() for p in task.params]
    with torch.no_grad():  # move off the reference so the per-pair coefficients differ
        for p in task.params:
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    idx = torch.arange(min(256, task.ref_w.shape[0]))
    ref_w, ref_l = task.ref_w[idx], task.ref_l[idx]
    expected = torch.autograd.grad(dpo_loss(*task.pair_logps(idx), ref_w, ref_l, beta=task.beta), task.params)
    before = [p.detach().clone() for p in task.params]
    opt = Balancer(torch.optim.SGD(task.params, lr=1.0))
    opt.backward(dpo_group_losses(*tap_pairs(opt, *task.pair_logps(idx)), ref_w, ref_l, beta=task.beta))
    opt.step()
    opt.zero_grad()
    got = [b - p.detach() for b, p in zip(before, task.params, strict=True)]
    err = max((g - e).abs().max().item() for g, e in zip(got, expected, strict=True))
    scale = max(e.abs().max().item() for e in expected)
    with torch.no_grad():
        for p, s in zip(task.params, start, strict=True):
            p.copy_(s)
    return {"max_abs_err": err, "max_abs_grad": scale, "rtol": rtol, "passed": err <= rtol * scale}


def reward_at_kl(kl: list[float], reward: list[float], target: float) -> float:
    """``E_π[r*]`` where a run's path (checkpoints in order) first reaches ``KL = target``.

    Linear interpolation between the two checkpoints around the first crossing; NaN if the path
    never reaches ``target``.
    """
    if kl and kl[0] >= target:
        return reward[0]
    for k0, k1, r0, r1 in zip(kl[:-1], kl[1:], reward[:-1], reward[1:], strict=True):
        if k1 >= target:
            return r0 + (target - k0) / (k1 - k0) * (r1 - r0)
    return math.nan


def matched_kl_gain(run: dict[str, Any], dpo: dict[str, Any]) -> tuple[float, float]:
    """``(K, R_run(K) − R_dpo(K))`` at ``K`` = the smaller of the two final KLs (same seed).

    Both paths start at ``π_ref`` (KL 0) and each ends at or beyond ``K``, so both rewards are read
    on the runs' own paths (:func:`reward_at_kl`): a positive gain is more reward for the same KL.
    """
    target = min(run["final"]["kl"], dpo["final"]["kl"])
    gain = reward_at_kl(run["curves"]["kl"], run["curves"]["expected_reward"], target) - reward_at_kl(
        dpo["curves"]["kl"], dpo["curves"]["expected_reward"], target
    )
    return target, gain


def run_setting(make: Callable[[int], Task], cfg: Any, seeds: int, rtol: float, name: str) -> dict[str, Any]:
    """Every method on every seed; adds the matched-KL gain (and the frontier gap, if the task has one)."""
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    check: dict[str, Any] = {}
    extra: list[dict[str, Any]] = []
    for seed in range(seeds):
        task = make(seed)
        start = [p.detach().clone() for p in task.params]
        if seed == 0:
            check = check_split(task, seed, rtol)
            err, scale = check["max_abs_err"], check["max_abs_grad"]
            print(f"[{name}] DPO split check: max |Δ| = {err:.2e} (max |g| = {scale:.2e})")
            if not check["passed"]:
                raise AssertionError(f"dpo_group_losses does not split the DPO gradient exactly: {check}")
        extra.append(describe(task))
        for method in METHODS:
            with torch.no_grad():
                for p, s in zip(task.params, start, strict=True):
                    p.copy_(s)
            torch.manual_seed(seed)
            run = train(task, method, cfg.steps, cfg.batch, cfg.lr, cfg.eval_every, seed)
            frontier = getattr(task, "frontier", None)
            if frontier is not None:
                run["final"]["frontier_gap"] = frontier(run["final"]["kl"]) - run["final"]["expected_reward"]
            runs[method].append(run)
        for method in METHODS:
            final = runs[method][-1]["final"]
            final["matched_kl"], final["matched_kl_gain"] = matched_kl_gain(runs[method][-1], runs["dpo"][-1])
        print(f"[{name}] seed {seed} done", flush=True)
    return {"config": dataclasses.asdict(cfg), "split_check": check, "task": extra, "runs": runs}


def describe(task: Task) -> dict[str, Any]:
    """The start and, for the discrete task, the ideal policy ``π*`` and the overlap of chosen and rejected."""
    out: dict[str, Any] = {f"start_{k}": v for k, v in task.evaluate(0).items()}
    ideal = getattr(task, "ideal_logp", None)
    if ideal is not None:
        out |= {f"ideal_{k}": v for k, v in task.evaluate(0, ideal()).items()}  # type: ignore[call-arg]
        out["chosen_overlap"] = task.overlap()  # type: ignore[attr-defined]
        grid = [0.25 * i for i in range(41)]  # KL 0..10
        out["frontier_kl"] = grid
        out["frontier_reward"] = [task.frontier(k) for k in grid]  # type: ignore[attr-defined]
    else:
        out["chosen_overlap"] = task.chosen_overlap  # type: ignore[attr-defined]
    return out
