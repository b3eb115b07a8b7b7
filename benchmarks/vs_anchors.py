"""The Balancer's aggregators against the anchor libraries: step time and extra memory.

The two CPU scenarios of the research notes (research/balancing-libraries.md, section 9), on 2
threads, Adam(lr=1e-3), k = 4:

* ``groups``: trunk ``Linear(512,1024)-ReLU-Linear(1024,512)-ReLU`` + one head ``Linear(512,10)``;
  the batch of 64 is split into 4 groups of 16 samples, one cross-entropy loss per group; every
  parameter is shared (n = 1,055,242).
* ``heads``: the same trunk + 4 heads ``Linear(512,10)``; batch 64, one trunk forward, 4
  cross-entropy task losses (n = 1,070,632, heads included).

Methods, for each aggregator (``upgrad``, ``mgda``, ``pcgrad``); one step is always forward +
the method's backward/aggregation + ``step()`` + ``zero_grad()``:

* ``sum``: the plain step on the summed losses (one forward over the batch, one backward);
  the same for every aggregator. ``sum-groups`` (``groups`` only): the same k per-group forward
  and backward passes as the Balancer, accumulated into ``.grad``: what the group structure
  itself costs, before any balancing.
* ``balancer``: ``Balancer(Adam, plugins=[aggregator])``. In ``groups`` each group is its own
  forward of 16 samples and its backward inside ``with opt.group(...)``: the way a user holding
  per-group batches writes it, and the cheaper correct one. One forward over the 64 samples and
  ``opt.backward`` of the 4 sliced group losses (``retain_graph``) runs each of the 4 backward
  passes over all 64 rows (the other groups' rows carry zero gradients, which autograd does not
  skip): about 1.2x the time of the per-group forwards in a development run. In ``heads``: one
  trunk forward and ``opt.backward({task: loss})``.
* ``balancer-tasks``: ``Balancer(Adam, plugins=[aggregator], model=net)`` and
  ``opt.backward_tasks({group: loss})`` on the same losses as ``balancer`` (per-group forwards in
  ``groups``, one trunk forward in ``heads``): one backward per loss asks only for the linear
  layers' output gradients, and the Gram and update come from those and the layer inputs. The
  recommended path for ``heads``: the time target applies to it.
* ``balancer-samples`` (``groups`` only): one forward over the 64 samples and
  ``opt.backward_samples(per_sample_losses / 16, group=row_groups)``: one backward pass. The
  recommended path for ``groups``: the time target applies to it.
* ``torchjd``: torchjd 0.18 as documented: ``autojac.backward(losses)`` (``groups``, one forward,
  the losses of the 4 sample groups) or ``autojac.mtl_backward(losses, features=trunk_output)``
  (``heads``), then ``jac_to_grad(params, aggregator)``; ``torchjd-gramopt`` is the same with
  ``jac_to_grad(..., optimize_gramian_computation=True)`` (no concatenated Jacobian; faster on
  CPU). The Balancer is compared with the faster of the two.
* ``libmtl``: LibMTL 1.1.5 ``LibMTL.weighting.MGDA`` (``mgda_gn='none'``) / ``PCGrad`` mixed into
  a minimal model class, as its Trainer does (it has no UPGrad). Loaded without LibMTL's package
  ``__init__`` (which needs torchvision): a bare ``LibMTL`` module pointing at the install folder,
  then ``import LibMTL.weighting``. Its k ``backward(retain_graph=True)`` passes take the same
  per-group forwards as the Balancer in ``groups`` (LibMTL's ``multi_input`` mode).
* ``pto``: pytorch-optimizer 4.1 ``PCGrad(Adam, reduction='sum')``, ``pc_backward(losses)``
  (pcgrad only), per-group forwards in ``groups`` as well.

Which update each method computes: in ``groups`` all methods aggregate the full gradients. In
``heads`` the Balancer and pytorch-optimizer aggregate the gradients of all parameters (a head's
coordinates are zero in the other tasks' gradients), which is torchjd's ``autojac.backward`` on
all parameters; torchjd's ``mtl_backward`` and LibMTL aggregate the trunk only and give the heads
their plain gradients. Before timing, the script takes one step of every method from the same
model and data and compares the gradient handed to Adam (captured by a step pre-hook; Adam's
first step is about ``lr·sign(g)``, so the gradient is the sharper test) with a reference of the
same definition, as a relative L2 difference (PASS below the printed tolerance): UPGrad against
torchjd; MGDA against the exact min-norm point of the Gram matrix (every support's KKT system
solved); PCGrad against the closest of its (k-1)!^k random projection orders (its result depends
on the order as soon as a gradient conflicts with two others). The reference for the trunk-only
definition aggregates the trunk columns and adds the heads' plain gradients.

Time: every method has its own seeded model and warms up; then all methods of a scenario take
steps in turn (the order rotates each round, so machine load hits all of them) and the median
step time is kept. The script re-executes itself with ``MALLOC_MMAP_THRESHOLD_=33554432`` and
``MALLOC_TRIM_THRESHOLD_=68719476736`` (as in the research notes): otherwise glibc returns the
multi-MB gradient buffers to the system at every free and page-faults them back in the next
step, which makes timings bimodal and 1.5-2x slower. For the Balancer, ``fwd+bwd`` is its
forward+backward time (capture copies included) and ``balance`` is ``opt.step()`` minus the inner
Adam step (Gram matrix, plugin, combination). The machine's load shows in every median: run it
on a quiet machine, and print ``uptime`` next to the numbers you quote.

Memory: torch's allocation records (``torch.profiler`` with ``profile_memory=True``), in time
order, from a freshly built model and optimizer (no gradient, no optimizer state) over the
first ``memory_steps`` steps: the peak of the bytes allocated and not yet freed. "extra" is that
peak minus the ``sum`` method's, in units of k·n·4 bytes, so buffers a method keeps between steps
count. The same measurement for every method; host memory outside torch tensors (numpy in
quadprog, LibMTL's Python loops) is not counted, and is tiny.

Targets (PASS/FAIL printed for every Balancer path; the script exits 0 either way): ``groups``
Balancer time <= 1.3x ``sum``; ``heads`` Balancer time <= 0.9x the faster torchjd; Balancer extra
memory <= 1.1 k·n everywhere. The time targets are the issue's for the scenario's recommended
path (``balancer-samples``, ``balancer-tasks``); the other paths are printed for comparison.

Run::

    python benchmarks/vs_anchors.py           # full run, about 1 minute on 2 quiet cores
    python benchmarks/vs_anchors.py --quick   # tiny model, 3 timed steps: a smoke run, < 1 minute
    python benchmarks/vs_anchors.py --threads 1 --cpu-time   # on a loaded machine (see --help)
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import itertools
import os
import random
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

from balancer import Balancer

THREADS = 2
CLOCK: list[Callable[[], float]] = [time.perf_counter]  # time.thread_time with --cpu-time
K = 4
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
GROUPS_TARGET = 1.3  # balancer / sum, groups scenario
HEADS_TARGET = 0.9  # balancer / fastest torchjd, heads scenario
MEMORY_TARGET = 1.1  # balancer extra memory, k*n*4 bytes
AGGREGATORS = ("upgrad", "mgda", "pcgrad")


@dataclass(frozen=True)
class Config:
    widths: tuple[int, int, int]  # trunk input, hidden, output widths
    classes: int
    batch: int  # whole batch; k groups of batch / k samples in "groups"
    warmup: int
    iters: int  # timed steps per method
    memory_steps: int


FULL = Config(widths=(512, 1024, 512), classes=10, batch=64, warmup=5, iters=30, memory_steps=3)
QUICK = Config(widths=(32, 64, 32), classes=10, batch=8, warmup=1, iters=3, memory_steps=2)


# -- model and data ------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, cfg: Config, heads: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        d_in, hidden, d_out = cfg.widths
        self.trunk = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(d_out, cfg.classes) for _ in range(heads))


@dataclass(frozen=True)
class Data:
    cfg: Config
    scenario: str
    x: Tensor  # [batch, d_in]
    y: Tensor  # [k, batch / k] (groups: group i's labels) or [k, batch] (heads: task i's labels)

    @property
    def heads(self) -> int:
        return K if self.scenario == "heads" else 1


def make_data(cfg: Config, scenario: str) -> Data:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(cfg.batch, cfg.widths[0], generator=gen)
    rows = cfg.batch if scenario == "heads" else cfg.batch // K
    return Data(cfg, scenario, x, torch.randint(cfg.classes, (K, rows), generator=gen))


def joint_losses(net: Net, data: Data) -> tuple[list[Tensor], Tensor]:
    """One forward over the whole batch: the k losses and the trunk output."""
    features = net.trunk(data.x)
    if data.scenario == "heads":
        return [cross_entropy(head(features), y) for head, y in zip(net.heads, data.y, strict=True)], features
    per_sample = cross_entropy(net.heads[0](features), data.y.flatten(), reduction="none")
    return list(per_sample.view(K, -1).mean(1).unbind()), features


def group_loss(net: Net, data: Data, i: int) -> Tensor:
    """Group i's loss from its own forward of batch / k samples (groups scenario)."""
    return cross_entropy(net.heads[0](net.trunk(data.x.chunk(K)[i])), data.y[i])


def split_losses(net: Net, data: Data) -> list[Tensor]:
    """groups: one forward per group; heads: the one shared forward."""
    if data.scenario == "heads":
        return joint_losses(net, data)[0]
    return [group_loss(net, data, i) for i in range(K)]


# -- methods -------------------------------------------------------------------------------------
Key = tuple[str, str]  # (aggregator, method); aggregator "-" for the sum baselines


@dataclass(frozen=True)
class StepTime:
    total: float
    forward_backward: float
    balance: float  # step() minus the inner optimizer's step


class Method:
    """One way to take a step; subclasses define ``backward`` and, if it wraps Adam, ``opt``."""

    def __init__(self, data: Data, aggregator: str) -> None:
        self.data = data
        self.aggregator = aggregator
        self.net = Net(data.cfg, data.heads)
        self.params = list(self.net.parameters())
        self.inner = torch.optim.Adam(self.params, lr=1e-3)
        self.opt: torch.optim.Optimizer = self.inner
        self.inner_seconds = 0.0
        self.captured: Tensor | None = None
        self._capture = False
        self.inner.register_step_pre_hook(self._pre)
        self.inner.register_step_post_hook(self._post)

    def _pre(self, *_: object) -> None:
        if self._capture:
            self.captured = torch.cat(
                [torch.zeros(p.numel()) if p.grad is None else p.grad.flatten() for p in self.params]
            )
        self._start = CLOCK[0]()

    def _post(self, *_: object) -> None:
        self.inner_seconds = CLOCK[0]() - self._start

    def backward(self) -> None:
        raise NotImplementedError

    def step(self) -> StepTime:
        start = CLOCK[0]()
        self.backward()
        backward_done = CLOCK[0]()
        self.opt.step()
        step_done = CLOCK[0]()
        self.opt.zero_grad()
        end = CLOCK[0]()
        return StepTime(end - start, backward_done - start, step_done - backward_done - self.inner_seconds)

    def first_gradient(self) -> Tensor:
        """Takes one step (seeded, for the random orders of PCGrad) and returns what Adam received."""
        random.seed(0)
        torch.manual_seed(0)
        self._capture = True
        self.step()
        self._capture = False
        assert self.captured is not None
        return self.captured


class SumStep(Method):
    def backward(self) -> None:
        torch.stack(joint_losses(self.net, self.data)[0]).sum().backward()


class SumGroupsStep(Method):
    """groups: the k per-group forward+backward passes of the Balancer, accumulated into ``.grad``."""

    def backward(self) -> None:
        for i in range(K):
            group_loss(self.net, self.data, i).backward()


class BalancerStep(Method):
    def __init__(self, data: Data, aggregator: str) -> None:
        super().__init__(data, aggregator)
        self.balancer = Balancer(self.inner, plugins=[aggregator])

        self.opt = self.balancer

    def backward(self) -> None:
        if self.data.scenario == "groups":
            for i in range(K):
                with self.balancer.group(f"g{i}"):
                    group_loss(self.net, self.data, i).backward()
        else:
            losses, _ = joint_losses(self.net, self.data)
            self.balancer.backward({f"t{i}": loss for i, loss in enumerate(losses)})


class BalancerSamplesStep(Method):
    """groups: ``Balancer(Adam, plugins=[aggregator], model=net)``, one forward over the whole batch
    and ``opt.backward_samples`` of the per-sample losses divided by the group size (so each group's
    loss is its mean, as in the other methods): one backward pass, no per-group gradient."""

    def __init__(self, data: Data, aggregator: str) -> None:
        super().__init__(data, aggregator)
        self.balancer = Balancer(self.inner, plugins=[aggregator], model=self.net)
        self.opt = self.balancer
        self.rows = data.cfg.batch // K
        self.groups = [f"g{i}" for i in range(K) for _ in range(self.rows)]

    def backward(self) -> None:
        logits = self.net.heads[0](self.net.trunk(self.data.x))
        per_sample = cross_entropy(logits, self.data.y.flatten(), reduction="none")
        self.balancer.backward_samples(per_sample / self.rows, group=self.groups)


class BalancerTasksStep(Method):
    """``Balancer(Adam, plugins=[aggregator], model=net)`` and ``opt.backward_tasks``: one backward
    per loss asks only for the linear layers' output gradients; no per-group gradient. ``groups``:
    the per-group forwards of ``balancer``; ``heads``: one trunk forward and the 4 task losses."""

    def __init__(self, data: Data, aggregator: str) -> None:
        super().__init__(data, aggregator)
        self.balancer = Balancer(self.inner, plugins=[aggregator], model=self.net)
        self.opt = self.balancer

    def backward(self) -> None:
        self.balancer.backward_tasks({f"g{i}": loss for i, loss in enumerate(split_losses(self.net, self.data))})


class TorchjdStep(Method):
    """torchjd's documented path; ``all_params`` forces ``autojac.backward`` on every parameter."""

    def __init__(self, data: Data, aggregator: str, gramopt: bool = False, all_params: bool = False) -> None:
        super().__init__(data, aggregator)
        aggregation = importlib.import_module("torchjd.aggregation")
        self.aggregation = {"upgrad": aggregation.UPGrad, "mgda": aggregation.MGDA, "pcgrad": aggregation.PCGrad}[
            aggregator
        ]()
        self.gramopt = gramopt
        self.mtl = data.scenario == "heads" and not all_params

    def backward(self) -> None:
        autojac = importlib.import_module("torchjd.autojac")
        losses, features = joint_losses(self.net, self.data)
        if self.mtl:
            autojac.mtl_backward(losses, features=features)
            shared = list(self.net.trunk.parameters())
        else:
            autojac.backward(losses)
            shared = self.params
        autojac.jac_to_grad(shared, self.aggregation, optimize_gramian_computation=self.gramopt)


@cache
def libmtl_weighting() -> types.ModuleType:
    """``LibMTL.weighting`` without ``LibMTL/__init__.py`` (which imports torchvision)."""
    spec = importlib.util.find_spec("LibMTL")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("LibMTL is not installed: pip install --no-deps LibMTL==1.1.5")
    if "LibMTL" not in sys.modules:
        package = types.ModuleType("LibMTL")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["LibMTL"] = package
    return importlib.import_module("LibMTL.weighting")


class LibmtlStep(Method):
    def __init__(self, data: Data, aggregator: str) -> None:
        super().__init__(data, aggregator)
        weighting = getattr(libmtl_weighting(), {"mgda": "MGDA", "pcgrad": "PCGrad"}[aggregator])
        shared = list(self.net.trunk.parameters()) if data.scenario == "heads" else self.params

        class Model(weighting):  # what LibMTL's Trainer mixes in: the shared params and task count
            task_num, device, rep_grad = K, torch.device("cpu"), False

            def get_share_params(self) -> list[Tensor]:
                return shared

            def zero_grad_share_params(self) -> None:  # LibMTL 1.1.5 predates set_to_none grads
                for p in shared:
                    if p.grad is not None:
                        p.grad.zero_()

        self.weighting = Model()
        self.kwargs = {"mgda_gn": "none"} if aggregator == "mgda" else {}

    def backward(self) -> None:
        self.weighting.backward(split_losses(self.net, self.data), **self.kwargs)


class PtoStep(Method):
    def __init__(self, data: Data, aggregator: str) -> None:
        super().__init__(data, aggregator)
        pcgrad = importlib.import_module("pytorch_optimizer").PCGrad
        self.opt = pcgrad(self.inner, reduction="sum")

    def backward(self) -> None:
        self.opt.pc_backward(split_losses(self.net, self.data))


Factory = Callable[[Data, str], Method]
METHODS: dict[str, Factory] = {
    "balancer": BalancerStep,
    "balancer-samples": BalancerSamplesStep,
    "balancer-tasks": BalancerTasksStep,
    "torchjd": TorchjdStep,
    "torchjd-gramopt": lambda data, agg: TorchjdStep(data, agg, gramopt=True),
    "libmtl": LibmtlStep,
    "pto": PtoStep,
}


def balancer_paths(scenario: str) -> list[str]:
    """The Balancer's ways to capture the groups; the last one is the scenario's recommended path,
    which the time target applies to."""
    return ["balancer"] + (["balancer-tasks", "balancer-samples"] if scenario == "groups" else ["balancer-tasks"])


def methods_of(aggregator: str, scenario: str) -> list[str]:
    names = balancer_paths(scenario) + ["torchjd", "torchjd-gramopt"]
    names += ["libmtl"] if aggregator in ("mgda", "pcgrad") else []
    names += ["pto"] if aggregator == "pcgrad" else []
    return names


def build(data: Data, key: tuple[str, str]) -> Method:
    aggregator, method = key
    baselines: dict[str, Factory] = {"sum": SumStep, "sum-groups": SumGroupsStep}
    return baselines[method](data, "-") if aggregator == "-" else METHODS[method](data, aggregator)


def all_keys(data: Data) -> list[tuple[str, str]]:
    baselines = [("-", "sum")] + ([("-", "sum-groups")] if data.scenario == "groups" else [])
    return baselines + [(agg, m) for agg in AGGREGATORS for m in methods_of(agg, data.scenario)]


# -- check ---------------------------------------------------------------------------------------
def relative_difference(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def first_rows(data: Data) -> Tensor:
    """The k group/task gradients of the initial model, ``[k, n]`` in float64."""
    method = SumStep(data, "-")
    rows = []
    for loss in split_losses(method.net, data):
        grads = torch.autograd.grad(loss, method.params, retain_graph=True, allow_unused=True)
        flat = [torch.zeros(p.numel()) if g is None else g.flatten() for p, g in zip(method.params, grads, strict=True)]
        rows.append(torch.cat(flat))
    return torch.stack(rows).double()


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
    return torch.stack([sum(ws) for ws in itertools.product(*per_row)])  # type: ignore[misc]


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


def check(data: Data, methods: dict[Key, Method]) -> bool:
    """The first step's gradient of every method against a reference update of the same definition."""
    rows = first_rows(data)
    gram = rows @ rows.T
    n_trunk = sum(p.numel() for p in Net(data.cfg, data.heads).trunk.parameters())
    conflicting = int((gram.triu(1) < 0).sum())
    print(f"check: first-step gradient handed to Adam, relative L2 difference; {conflicting} conflicting pairs")
    ok = True
    for agg in AGGREGATORS:
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
            else:
                exact = mgda_weights if agg == "mgda" else pcgrad_weights
                ref_name = ("exact MGDA" if agg == "mgda" else "PCGrad, closest order") + suffix
                diff = closest_difference(grad, rows, n_trunk if trunk else rows.shape[1], exact)
            tol = tolerance(agg, m)
            ok &= diff <= tol
            print(f"  {agg:<7} {m:<16} vs {ref_name:<29} {diff:9.2e}   {verdict(diff <= tol)} (tol {tol:.0e})")
    return ok


# -- time ----------------------------------------------------------------------------------------
def time_methods(cfg: Config, methods: dict[Key, Method]) -> dict[Key, list[StepTime]]:
    for method in methods.values():
        for _ in range(cfg.warmup):
            method.step()
    keys = list(methods)
    samples: dict[tuple[str, str], list[StepTime]] = {key: [] for key in keys}
    for i in range(cfg.iters):
        shift = i % len(keys)
        for key in keys[shift:] + keys[:shift]:
            samples[key].append(methods[key].step())
    return samples


def median_ms(samples: list[StepTime], field: str = "total") -> float:
    return 1e3 * statistics.median(getattr(s, field) for s in samples)


# -- memory --------------------------------------------------------------------------------------
def measure_memory(data: Data, keys: list[Key], steps: int) -> dict[Key, tuple[int, int]]:
    """Per method: the peak of the torch-allocated bytes live in its window (its ``steps`` steps
    from a freshly built model and optimizer), over all steps and over steps 2.. only.

    One profiler session for all methods (starting one costs about a second); each method is
    built and freed outside every window, with the garbage collector off inside, so only the
    method's own allocations and frees fall in its window.
    """
    windows: dict[Key, list[str]] = {key: [f"vs_anchors {key} step {i}" for i in range(steps)] for key in keys}
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        for key in keys:
            method = build(data, key)
            gc.collect()
            gc.disable()
            try:
                for label in windows[key]:
                    with torch.profiler.record_function(label):
                        method.step()
            finally:
                gc.enable()
            del method
            gc.collect()
    events = prof.profiler.kineto_results.events()
    marks = {e.name(): (e.start_ns(), e.end_ns()) for e in events if e.name().startswith("vs_anchors ")}
    records = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    peaks = {}
    for key, labels in windows.items():
        start, second, end = marks[labels[0]][0], marks[labels[min(1, steps - 1)]][0], marks[labels[-1]][1]
        live = peak = steady = 0
        for time_ns, nbytes in records:
            if start <= time_ns <= end:
                live += nbytes
                peak = max(peak, live)
                steady = max(steady, live) if time_ns >= second else steady
        peaks[key] = (peak, steady)
    return peaks


# -- report --------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(data: Data, n: int, samples: dict[Key, list[StepTime]], peaks: dict[Key, tuple[int, int]]) -> None:
    unit = K * n * 4
    base = median_ms(samples[("-", "sum")])
    sum_peak, sum_steady = peaks[("-", "sum")]

    def extra(key: Key) -> tuple[float, float]:
        peak, steady = peaks[key]
        return (peak - sum_peak) / unit, (steady - sum_steady) / unit

    print("\nmedian ms per step; extra memory in k·n·4 bytes over sum's: peak over all steps, steady = steps 2..")
    print(f"{'agg':<7} {'method':<16} {'ms':>7} {'x sum':>6} {'extra':>7} {'steady':>7}")
    for key in samples:
        ms = median_ms(samples[key])
        print(f"{key[0]:<7} {key[1]:<16} {ms:>7.2f} {ms / base:>6.2f} {extra(key)[0]:>7.3f} {extra(key)[1]:>7.3f}")
    paths = balancer_paths(data.scenario)
    print(f"\nBalancer time / method time, per Balancer path; fwd+bwd and balance ms; target: {target_text(data)}")
    print(
        f"{'agg':<7} {'path':<16} {'/sum':>6} {'/torchjd':>9} {'/libmtl':>8} {'/pto':>6} {'fwd+bwd':>8} "
        f"{'balance':>8} {'extra':>7}  verdicts"
    )
    for path in paths:
        for agg in AGGREGATORS:
            own = median_ms(samples[(agg, path)])
            ratio = {m: own / median_ms(samples[(agg, m)]) if (agg, m) in samples else None for m in METHODS}
            torchjd = max(ratio["torchjd"] or 0.0, ratio["torchjd-gramopt"] or 0.0)  # vs the faster torchjd
            peak = extra((agg, path))[0]
            time_ok = own / base <= GROUPS_TARGET if data.scenario == "groups" else torchjd <= HEADS_TARGET
            cells = [f"{own / base:>5.2f}x", f"{torchjd:>8.2f}x"]
            cells += [f"{ratio[m]:>{w}.2f}x" if ratio[m] else f"{'-':>{w + 1}}" for m, w in (("libmtl", 7), ("pto", 5))]
            fb = median_ms(samples[(agg, path)], "forward_backward")
            balance = median_ms(samples[(agg, path)], "balance")
            print(
                f"{agg:<7} {path:<16} {' '.join(cells)} {fb:>8.2f} {balance:>8.2f} {peak:>7.3f}  "
                f"time {verdict(time_ok)}, memory {verdict(peak <= MEMORY_TARGET)}"
            )
    print(f"targets apply to the recommended path for this scenario: {paths[-1]}")


def target_text(data: Data) -> str:
    if data.scenario == "groups":
        return f"time <= {GROUPS_TARGET}x sum, extra <= {MEMORY_TARGET} k·n"
    return f"time <= {HEADS_TARGET}x the faster torchjd, extra <= {MEMORY_TARGET} k·n"


def run_scenario(cfg: Config, scenario: str, check_only: bool) -> bool:
    data = make_data(cfg, scenario)
    n = sum(p.numel() for p in Net(cfg, data.heads).parameters())
    d_in, hidden, d_out = cfg.widths
    shape = f"trunk {d_in}-{hidden}-{d_out} + {data.heads} head(s) -> {cfg.classes}"
    split = f"batch {cfg.batch}" + (f" as {K} groups of {cfg.batch // K}" if scenario == "groups" else f", {K} tasks")
    print(f"\n== {scenario}: {shape}, {split}; n = {n:,}; k·n·4 bytes = {K * n * 4 / 2**20:.1f} MiB")
    keys = all_keys(data)
    if check_only:
        return check(data, {key: build(data, key) for key in keys})
    peaks = measure_memory(data, keys, cfg.memory_steps)
    methods = {key: build(data, key) for key in keys}
    ok = check(data, methods)
    samples = time_methods(cfg, methods)
    report(data, n, samples, peaks)
    return ok


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The Balancer's aggregators against torchjd, LibMTL, pytorch-optimizer."
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 timed steps (smoke run)")
    parser.add_argument("--scenario", choices=("groups", "heads"), action="append", help="default: both")
    parser.add_argument("--check-only", action="store_true", help="only the first-step check, no timing")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"intra-op threads (default {THREADS})")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with this thread's CPU time instead of the wall clock (with --threads 1: on a loaded "
        "machine, other processes' load then hardly counts; a CPU's whole step runs in this thread)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_time and args.threads != 1:
        raise SystemExit("--cpu-time measures one thread: use it with --threads 1")
    torch.set_num_threads(args.threads)
    CLOCK[0] = time.thread_time if args.cpu_time else time.perf_counter
    cfg = QUICK if args.quick else FULL
    started = time.perf_counter()
    tuned = all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items())
    clock = "CPU time of this thread" if args.cpu_time else "wall clock"
    print(
        f"{args.threads} thread(s), {clock}; Adam(lr=1e-3); k = {K}; {cfg.iters} interleaved timed steps per "
        f"method after {cfg.warmup} warm-up steps; medians. Allocator: "
        + (" ".join(f"{k}={v}" for k, v in ALLOCATOR_ENV.items()) if tuned else "glibc defaults (not re-executed)")
    )
    print(f"memory: peak torch-allocated live bytes over the first {cfg.memory_steps} steps minus sum's")
    if args.quick:
        print("--quick: a smoke run of the benchmark's code; its numbers say nothing about speed")
    ok = True
    for scenario in args.scenario or ("groups", "heads"):
        ok &= run_scenario(cfg, scenario, args.check_only)
    print(f"\ncheck: {verdict(ok)}")
    print(f"total run time: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    if any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR_ENV})
    raise SystemExit(main())
