"""DPO's chosen/rejected gradient imbalance, and what ``balanced_dpo`` does about it.

Ma et al., *Gradient Imbalance in Direct Preference Optimization* (Balanced-DPO, arXiv
2502.20847) analyse DPO in a discrete response space; their exact reweighting could not be
obtained, so this script compares plain DPO with the two rules the ``balanced_dpo`` plugin
implements (see its docstring): ``"norm"`` (equal chosen/rejected parameter-gradient norms) and
``"prob"`` (probability-space balance ``min(C, π_w/π_l)`` at the log-prob taps), the latter
rescaling either the chosen side (default) or the rejected side. Two settings, same seeds,
steps, batches and optimizer (Adam, β = 0.1) for every method:

1. ``discrete``: P prompts, K responses each, features φ(x, y), a log-linear policy
   ``softmax_y(θᵀφ(x, y))`` with one θ shared by all responses (so probability can leak to
   responses that never appear in training), ``π_ref`` = the policy at the start θ₀, a hidden
   reward ``r* = w*ᵀφ + noise``, pairs drawn from the ``|S|`` responses ``π_ref`` likes most
   and labelled by Bradley–Terry with ``r*``. Every metric is exact.
2. ``autoregressive``: a one-layer GRU language model over 16 tokens (token 0 ends a response,
   at most 6 tokens), pretrained on a random Markov source to give ``π_ref``; pairs sampled from
   ``π_ref`` and labelled with a hidden token + bigram reward. Expected reward and KL are Monte
   Carlo estimates on sequences sampled from the policy; the mass outside the training
   responses is exact.

Plain DPO is the Balancer without plugins on :func:`balancer.recipes.dpo.dpo_group_losses`, whose
gradient is checked once per setting against :func:`balancer.recipes.dpo.dpo_loss` (``split_check``).
The optimizer is Adam, as DPO is trained in practice; it normalises the overall step size, so
the methods differ by how they balance chosen against rejected and weight the pairs, not by a
global scale (under SGD the prob rule's side "rejected" would also mean smaller steps).

Table columns: changes of the mean training-pair log-probs since the start, probability mass
outside the training responses, expected hidden reward, KL(π‖π_ref), DPO's implicit reward
margin, ``E_π[r*]`` minus the best DPO reached at no more KL (same seed, along DPO's path:
positive = a better reward/KL trade-off), and the mean over steps of the rejected/chosen
gradient-norm ratio as the Balancer captured it (after any tap rescaling, before the group
weights) and as applied (after the weights). Per step, the JSON also holds the norms, weights
and the range of the factors the taps applied to each side.

Run (2 CPU cores: about 2 minutes; ``--quick``: seconds)::

    python examples/experiments/dpo_imbalance.py --plot docs/dpo-logprobs.png

It prints one markdown table per setting (mean ± sd over seeds) and writes
``OUT/results.json`` (every seed's curves and gradient statistics) and the figure. The same
seeds give byte-identical JSON (one thread, deterministic algorithms).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from balancer import Balancer
from balancer.recipes.dpo import dpo_group_losses, dpo_loss, dpo_metrics, sequence_logprobs, tap_pairs

BETA = 0.1
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
    "norm": 'balanced_dpo "norm"',
    "prob_chosen": 'balanced_dpo "prob", side chosen',
    "prob_chosen_floor": 'balanced_dpo "prob", side chosen, floor 1/C',
    "prob_rejected": 'balanced_dpo "prob", side rejected',
}


@dataclasses.dataclass(frozen=True)
class Discrete:
    prompts: int = 8
    responses: int = 64
    dim: int = 16
    in_dist: int = 16  # |S|
    pairs: int = 2000
    ref_logit_std: float = 1.5  # scale of θ₀ᵀφ
    reward_std: float = 2.0  # scale of w*ᵀφ
    reward_noise: float = 0.5
    steps: int = 1000
    batch: int = 64
    lr: float = 1e-2
    eval_every: int = 20


@dataclasses.dataclass(frozen=True)
class Autoregressive:
    prompts: int = 4
    vocab: int = 16  # token 0 ends a response
    length: int = 6
    hidden: int = 64
    pretrain_steps: int = 150
    pretrain_batch: int = 128
    pairs: int = 1024
    steps: int = 300
    batch: int = 64
    lr: float = 1e-3
    eval_every: int = 25
    mc_samples: int = 256  # per prompt, for E_π[r*] and KL


QUICK = {
    "discrete": Discrete(steps=60, pairs=400, eval_every=10),
    "autoregressive": Autoregressive(pretrain_steps=20, pairs=128, steps=20, eval_every=10, mc_samples=32),
}


class Task:
    """A DPO problem: trainable parameters, pair log-probs for a batch, exact or MC metrics."""

    params: list[Tensor]
    ref_w: Tensor
    ref_l: Tensor

    def pair_logps(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def evaluate(self, step: int) -> dict[str, float]:
        raise NotImplementedError


# -- setting 1: discrete response space ---------------------------------------------------------
class DiscreteTask(Task):
    def __init__(self, cfg: Discrete, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        self.phi = torch.randn(cfg.prompts, cfg.responses, cfg.dim, generator=gen, dtype=f64)
        theta0 = torch.randn(cfg.dim, generator=gen, dtype=f64) * cfg.ref_logit_std / math.sqrt(cfg.dim)
        w_star = torch.randn(cfg.dim, generator=gen, dtype=f64) * cfg.reward_std / math.sqrt(cfg.dim)
        noise = torch.randn(cfg.prompts, cfg.responses, generator=gen, dtype=f64) * cfg.reward_noise
        self.reward = self.phi @ w_star + noise
        self.ref_logp = (self.phi @ theta0).log_softmax(-1)
        top = self.ref_logp.topk(cfg.in_dist, dim=-1).indices
        self.in_s = torch.zeros(cfg.prompts, cfg.responses, dtype=torch.bool).scatter_(1, top, True)
        x = torch.randint(cfg.prompts, (cfg.pairs,), generator=gen)
        a, b = (top[x, torch.randint(cfg.in_dist, (cfg.pairs,), generator=gen)] for _ in range(2))
        while bool((same := a == b).any()):  # two distinct responses per pair
            b = torch.where(same, top[x, torch.randint(cfg.in_dist, (cfg.pairs,), generator=gen)], b)
        a_wins = torch.rand(cfg.pairs, generator=gen, dtype=f64) < torch.sigmoid(self.reward[x, a] - self.reward[x, b])
        self.x, self.w, self.l = x, torch.where(a_wins, a, b), torch.where(a_wins, b, a)
        self.ref_w, self.ref_l = self.ref_logp[x, self.w], self.ref_logp[x, self.l]
        self.theta = theta0.clone().requires_grad_(True)
        self.params = [self.theta]

    def logp(self) -> Tensor:
        return (self.phi @ self.theta).log_softmax(-1)

    def pair_logps(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        logp = self.logp()
        return logp[self.x[idx], self.w[idx]], logp[self.x[idx], self.l[idx]]

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        logp = self.logp()
        pi = logp.exp()
        m = dpo_metrics(logp[self.x, self.w], logp[self.x, self.l], self.ref_w, self.ref_l, beta=BETA)
        implicit = BETA * (logp - self.ref_logp)
        return {
            "logp_chosen": m["logp_chosen"].item(),
            "logp_rejected": m["logp_rejected"].item(),
            "reward_margin": m["reward_margin"].item(),
            "reward_accuracy": m["reward_accuracy"].item(),
            "ood_mass": (pi * ~self.in_s).sum(-1).mean().item(),
            "ood_implicit_reward": implicit[~self.in_s].mean().item(),  # "OOD overestimation"
            "expected_reward": (pi * self.reward).sum(-1).mean().item(),
            "kl": (pi * (logp - self.ref_logp)).sum(-1).mean().item(),
        }


# -- setting 2: a tiny autoregressive LM --------------------------------------------------------
class TinyLM(torch.nn.Module):
    def __init__(self, prompts: int, vocab: int, hidden: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.embed = torch.nn.Embedding(vocab + prompts, 32)  # ids >= vocab: the prompt tokens
        self.gru = torch.nn.GRU(32, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, prompt: Tensor, tokens: Tensor) -> Tensor:
        """Logits ``[B, T, V]``: position t predicts ``tokens[:, t]`` from the prompt and ``tokens[:, :t]``."""
        inputs = torch.cat([self.vocab + prompt[:, None], tokens[:, :-1]], dim=1)
        return self.head(self.gru(self.embed(inputs))[0])

    @torch.no_grad()
    def sample(self, prompt: Tensor, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        tokens, h, last = [], None, self.vocab + prompt
        for _ in range(length):
            out, h = self.gru(self.embed(last)[:, None], h)
            last = torch.multinomial(self.head(out[:, 0]).softmax(-1), 1, generator=gen)[:, 0]
            tokens.append(last)
        return _close(torch.stack(tokens, dim=1))


def _close(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Zeroes everything after the first end token; the mask counts tokens up to and including it."""
    end = tokens == 0
    mask = (end.long().cumsum(1) - end.long()) == 0
    return torch.where(mask, tokens, 0), mask


def _markov_source(cfg: Autoregressive, gen: torch.Generator, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pretraining data: per-prompt start logits, shared bigram logits, an end token ever likelier."""
    start = torch.randn(cfg.prompts, cfg.vocab, generator=gen) * 2.0
    start[:, 0] = -math.inf
    trans = torch.randn(cfg.vocab, cfg.vocab, generator=gen) * 2.0
    prompt = torch.randint(cfg.prompts, (n,), generator=gen)
    tokens = [torch.multinomial(start[prompt].softmax(-1), 1, generator=gen)[:, 0]]
    for t in range(1, cfg.length):
        logits = trans[tokens[-1]].clone()
        logits[:, 0] = -2.0 + 1.0 * t
        tokens.append(torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0])
    return prompt, *_close(torch.stack(tokens, dim=1))


class AutoregressiveTask(Task):
    def __init__(self, cfg: Autoregressive, seed: int) -> None:
        self.cfg = cfg
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.model = TinyLM(cfg.prompts, cfg.vocab, cfg.hidden)
        self._pretrain(gen)
        self.ref = copy.deepcopy(self.model).requires_grad_(False)
        self.token_reward = torch.randn(cfg.prompts, cfg.vocab, generator=gen)
        self.bigram_reward = torch.randn(cfg.vocab, cfg.vocab, generator=gen) * 0.5
        x = torch.arange(cfg.pairs) % cfg.prompts
        (ya, ma), (yb, mb) = (self.ref.sample(x, cfg.length, gen) for _ in range(2))
        a_wins = torch.rand(cfg.pairs, generator=gen) < torch.sigmoid(self.reward(x, ya, ma) - self.reward(x, yb, mb))
        pick = a_wins[:, None]
        self.x = x
        self.yw, self.mw = torch.where(pick, ya, yb), torch.where(pick, ma, mb)
        self.yl, self.ml = torch.where(pick, yb, ya), torch.where(pick, mb, ma)
        with torch.no_grad():
            self.ref_w, self.ref_l = (
                self._logp(self.ref, x, self.yw, self.mw),
                self._logp(self.ref, x, self.yl, self.ml),
            )
        seen = torch.cat([torch.cat([x, x])[:, None], torch.cat([self.yw, self.yl])], dim=1)
        self.distinct = torch.unique(seen, dim=0)  # the training responses, per prompt
        self.params = list(self.model.parameters())

    def _pretrain(self, gen: torch.Generator) -> None:
        cfg = self.cfg
        prompt, tokens, mask = _markov_source(cfg, gen, cfg.pretrain_steps * cfg.pretrain_batch)
        adam = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        for i in range(cfg.pretrain_steps):
            rows = slice(i * cfg.pretrain_batch, (i + 1) * cfg.pretrain_batch)
            nll = -self._logp(self.model, prompt[rows], tokens[rows], mask[rows]).mean()
            adam.zero_grad()
            nll.backward()
            adam.step()
        adam.zero_grad()  # a stale .grad would join the first Balancer step as an ungrouped gradient

    @staticmethod
    def _logp(model: TinyLM, prompt: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        return sequence_logprobs(model(prompt, tokens), tokens, mask)

    def reward(self, prompt: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        content = mask & (tokens != 0)
        unigram = torch.where(content, self.token_reward[prompt[:, None], tokens], 0.0).sum(1)
        pairs = content[:, 1:] & content[:, :-1]
        bigram = torch.where(pairs, self.bigram_reward[tokens[:, :-1], tokens[:, 1:]], 0.0).sum(1)
        return unigram + bigram

    def pair_logps(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([self.x[idx], self.x[idx]])
        logp = self._logp(
            self.model, x, torch.cat([self.yw[idx], self.yl[idx]]), torch.cat([self.mw[idx], self.ml[idx]])
        )
        return logp[: idx.shape[0]], logp[idx.shape[0] :]

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        lw = self._logp(self.model, self.x, self.yw, self.mw)
        ll = self._logp(self.model, self.x, self.yl, self.ml)
        m = dpo_metrics(lw, ll, self.ref_w, self.ref_l, beta=BETA)
        in_mass = torch.zeros(cfg.prompts).index_add_(
            0, self.distinct[:, 0], self._logp(self.model, self.distinct[:, 0], *_close(self.distinct[:, 1:])).exp()
        )
        gen = torch.Generator().manual_seed(10_000 * self.seed + step)
        prompt = torch.arange(cfg.prompts).repeat_interleave(cfg.mc_samples)
        tokens, mask = self.model.sample(prompt, cfg.length, gen)
        log_ratio = self._logp(self.model, prompt, tokens, mask) - self._logp(self.ref, prompt, tokens, mask)
        return {
            "logp_chosen": m["logp_chosen"].item(),
            "logp_rejected": m["logp_rejected"].item(),
            "reward_margin": m["reward_margin"].item(),
            "reward_accuracy": m["reward_accuracy"].item(),
            "ood_mass": (1.0 - in_mass).mean().item(),
            "expected_reward": self.reward(prompt, tokens, mask).mean().item(),
            "kl": log_ratio.mean().item(),
        }


# -- training -------------------------------------------------------------------------------
def train(task: Task, method: str, steps: int, batch: int, lr: float, eval_every: int, seed: int) -> dict[str, Any]:
    """Trains ``task`` from its start with one method; returns its curves and gradient statistics."""
    opt = Balancer(torch.optim.Adam(task.params, lr=lr), plugins=METHODS[method])
    order = torch.Generator().manual_seed(seed + 1)  # the same batches for every method
    n_pairs = task.ref_w.shape[0]
    curves: dict[str, list[float]] = {"step": []}
    grads: dict[str, list[float]] = {
        k: [] for k in ("chosen_norm", "rejected_norm", "chosen_weight", "rejected_weight")
    }

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
        opt.backward(dpo_group_losses(logp_w, logp_l, task.ref_w[idx], task.ref_l[idx], beta=BETA))
        opt.step()
        opt.zero_grad()
        stats = opt.last_stats
        for side, s in (("chosen", "w"), ("rejected", "l")):
            i = stats.names.index(side)
            grads[f"{side}_norm"].append(stats.norms[i].item())
            grads[f"{side}_weight"].append(stats.weights[i].item())
            # what the taps did to each pair's gradient: (after the tap) / (arriving at the tap)
            pre, post = arriving[f"pre_{s}"], arriving[f"post_{s}"]
            factor = (post / pre)[pre != 0]
            grads.setdefault(f"{side}_factor_min", []).append(factor.min().item())
            grads.setdefault(f"{side}_factor_max", []).append(factor.max().item())
        mean_factor = opt.plugin_metrics().get("balanced_dpo", {}).get("prob_factor")
        if mean_factor is not None and not math.isnan(mean_factor.item()):
            grads.setdefault("prob_factor", []).append(mean_factor.item())
    record(steps)
    final = {key: values[-1] for key, values in curves.items() if key != "step"}
    final["delta_logp_chosen"] = curves["logp_chosen"][-1] - curves["logp_chosen"][0]
    final["delta_logp_rejected"] = curves["logp_rejected"][-1] - curves["logp_rejected"][0]
    norm_w, norm_l = torch.tensor(grads["chosen_norm"]), torch.tensor(grads["rejected_norm"])
    weight_w, weight_l = torch.tensor(grads["chosen_weight"]), torch.tensor(grads["rejected_weight"])
    final["grad_ratio_raw"] = (norm_l / norm_w).mean().item()
    final["grad_ratio_applied"] = (weight_l * norm_l / (weight_w * norm_w)).mean().item()
    final["mean_chosen_weight"], final["mean_rejected_weight"] = weight_w.mean().item(), weight_l.mean().item()
    for side in ("chosen", "rejected"):
        final[f"{side}_factor_min"] = min(grads[f"{side}_factor_min"])
        final[f"{side}_factor_max"] = max(grads[f"{side}_factor_max"])
    if "prob_factor" in grads:
        final["prob_factor"] = sum(grads["prob_factor"]) / len(grads["prob_factor"])
    return {"seed": seed, "final": final, "curves": curves, "grads": grads}


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

    One SGD step with lr 1 on a copy of the parameters: ``before − after`` is the combined gradient.
    """
    gen = torch.Generator().manual_seed(seed)
    start = [p.detach().clone() for p in task.params]
    with torch.no_grad():  # move off the reference so the per-pair coefficients differ
        for p in task.params:
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    idx = torch.arange(min(256, task.ref_w.shape[0]))
    ref_w, ref_l = task.ref_w[idx], task.ref_l[idx]
    expected = torch.autograd.grad(dpo_loss(*task.pair_logps(idx), ref_w, ref_l, beta=BETA), task.params)
    before = [p.detach().clone() for p in task.params]
    opt = Balancer(torch.optim.SGD(task.params, lr=1.0))
    opt.backward(dpo_group_losses(*tap_pairs(opt, *task.pair_logps(idx)), ref_w, ref_l, beta=BETA))
    opt.step()
    opt.zero_grad()
    got = [b - p.detach() for b, p in zip(before, task.params, strict=True)]
    err = max((g - e).abs().max().item() for g, e in zip(got, expected, strict=True))
    scale = max(e.abs().max().item() for e in expected)
    with torch.no_grad():
        for p, s in zip(task.params, start, strict=True):
            p.copy_(s)
    return {"max_abs_err": err, "max_abs_grad": scale, "rtol": rtol, "passed": err <= rtol * scale}


def run_setting(name: str, make: Callable[[int], Task], cfg: Any, seeds: int, rtol: float) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    check: dict[str, Any] = {}
    for seed in range(seeds):
        task = make(seed)
        start = [p.detach().clone() for p in task.params]
        if seed == 0:
            check = check_split(task, seed, rtol)
            err, scale = check["max_abs_err"], check["max_abs_grad"]
            print(f"[{name}] DPO split check: max |Δ| = {err:.2e} (max |g| = {scale:.2e})")
            if not check["passed"]:
                raise AssertionError(f"dpo_group_losses does not split the DPO gradient exactly: {check}")
        for method in METHODS:
            with torch.no_grad():
                for p, s in zip(task.params, start, strict=True):
                    p.copy_(s)
            torch.manual_seed(seed)
            runs[method].append(train(task, method, cfg.steps, cfg.batch, cfg.lr, cfg.eval_every, seed))
        for method in METHODS:
            runs[method][-1]["final"]["reward_vs_dpo_same_kl"] = reward_at_dpo_kl(runs[method][-1], runs["dpo"][-1])
        print(f"[{name}] seed {seed} done", flush=True)
    return {"config": dataclasses.asdict(cfg), "split_check": check, "runs": runs, "summary": summarize(runs)}


def reward_at_dpo_kl(run: dict[str, Any], dpo: dict[str, Any]) -> float:
    """``E_π[r*]`` minus the best DPO reached at no more KL, along DPO's own (interpolated) path.

    Zero or negative for DPO itself; beyond DPO's largest KL it compares with DPO's best.
    """
    kl, reward, target = dpo["curves"]["kl"], dpo["curves"]["expected_reward"], run["final"]["kl"]
    best = -math.inf
    points = list(zip(kl, reward, strict=True))
    for (k0, r0), (k1, r1) in zip(points[:-1], points[1:], strict=True):
        best = max([best] + [r for k, r in ((k0, r0), (k1, r1)) if k <= target])
        if min(k0, k1) < target < max(k0, k1):
            best = max(best, r0 + (target - k0) / (k1 - k0) * (r1 - r0))
    return run["final"]["expected_reward"] - best


# -- reporting ------------------------------------------------------------------------------
COLUMNS = {
    "delta_logp_chosen": "Δ log π_w",
    "delta_logp_rejected": "Δ log π_l",
    "ood_mass": "OOD mass",
    "expected_reward": "E_π[r*]",
    "kl": "KL(π‖π_ref)",
    "reward_margin": "reward margin",
    "reward_vs_dpo_same_kl": "E_π[r*] − DPO's at ≤ KL",
    "grad_ratio_raw": "‖G_l‖/‖G_w‖",
    "grad_ratio_applied": "w_l‖G_l‖/(w_w‖G_w‖)",
}


def _mean_std(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    return [t.mean().item(), t.std().item() if len(values) > 1 else 0.0]


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, list[float]]]:
    return {m: {k: _mean_std([r["final"][k] for r in rs]) for k in rs[0]["final"]} for m, rs in runs.items()}


def table(result: dict[str, Any], start: dict[str, float]) -> str:
    lines = ["| method | " + " | ".join(COLUMNS.values()) + " |", "| --- " * (len(COLUMNS) + 1) + "|"]
    for method, summary in result["summary"].items():
        cells = [f"{summary[k][0]:.2f} ± {summary[k][1]:.2f}" for k in COLUMNS]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    ref = f"start (π_ref): E_π[r*] = {start['expected_reward'][0]:.2f} ± {start['expected_reward'][1]:.2f}"
    ref += f", OOD mass = {start['ood_mass'][0]:.2f} ± {start['ood_mass'][1]:.2f}"
    return "\n".join(lines) + "\n\n" + ref


def start_summary(result: dict[str, Any]) -> dict[str, list[float]]:
    first = result["runs"]["dpo"]
    return {k: _mean_std([r["curves"][k][0] for r in first]) for k in ("expected_reward", "ood_mass")}


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4 * len(results)), squeeze=False)
    for row, (name, result) in zip(axes, results.items(), strict=True):
        for ax, side in zip(row, ("chosen", "rejected"), strict=True):
            for method, runs in result["runs"].items():
                steps = runs[0]["curves"]["step"]
                curves = torch.tensor(
                    [[v - r["curves"][f"logp_{side}"][0] for v in r["curves"][f"logp_{side}"]] for r in runs]
                )
                mean, std = curves.mean(0), curves.std(0) if len(runs) > 1 else torch.zeros(len(steps))
                ax.plot(steps, mean, label=LABELS[method])
                ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
            ax.axhline(0.0, color="grey", lw=0.5)
            ax.set_yscale("symlog", linthresh=1.0)  # small early changes and late collapses both readable
            ax.set_title(f"{name}: {side} log-prob (training pairs)")
            ax.set_xlabel("step")
            ax.set_ylabel(f"Δ mean log π_{'w' if side == 'chosen' else 'l'} vs start (symlog)")
    axes[0][0].legend(fontsize=8)
    seeds = len(next(iter(results.values()))["runs"]["dpo"])
    fig.suptitle(f"DPO vs balanced_dpo: mean over the training pairs, mean ± sd over {seeds} seeds (β = {BETA})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 seeds: a smoke test of the pipeline")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 5, or 2 with --quick)")
    parser.add_argument("--out", type=Path, default=Path("dpo-imbalance"), help="folder for results.json")
    parser.add_argument("--plot", type=Path, default=None, help="figure path (default OUT/dpo-logprobs.png)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (results depend on it)")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    discrete = QUICK["discrete"] if args.quick else Discrete()
    autoregressive = QUICK["autoregressive"] if args.quick else Autoregressive()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    results = {
        "discrete": run_setting("discrete", lambda s: DiscreteTask(discrete, s), discrete, seeds, 1e-9),
        "autoregressive": run_setting(
            "autoregressive", lambda s: AutoregressiveTask(autoregressive, s), autoregressive, seeds, 1e-4
        ),
    }
    for name, result in results.items():
        cfg = result["config"]
        print(
            f"\n### {name}: {seeds} seeds, {cfg['steps']} Adam steps (lr {cfg['lr']}), batch {cfg['batch']}, β {BETA}\n"
        )
        print(table(result, start_summary(result)))
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"beta": BETA, "seeds": seeds, "quick": args.quick, "threads": args.threads, "methods": METHODS, **results}
    (args.out / "results.json").write_text(json.dumps(out, sort_keys=True, allow_nan=False) + "\n")
    figure = args.plot or args.out / "dpo-logprobs.png"
    plot(results, figure)
    print(f"\nResults: {args.out / 'results.json'}\nFigure:  {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
