"""The two scenarios of ``vs_anchors.py`` and the methods' ways to take a step there.

``Config`` fixes the model and timing sizes, ``make_data`` the batch, ``Method`` subclasses one
step each (forward, the method's backward and aggregation, ``opt.step()``, ``zero_grad()``): the
sums, the Balancer's paths, torchjd and pytorch-optimizer here, LibMTL's weighting methods in
``anchor_methods_weighting.py``; ``anchor_catalog.build`` makes a method from its ``(aggregator,
method)`` key. What each method computes and why is in the docstring of ``vs_anchors.py``.
"""

from __future__ import annotations

import importlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

from balancer import Balancer

CLOCK: list[Callable[[], float]] = [time.perf_counter]  # time.thread_time with --cpu-time
K = 4
LR = 1e-3  # Adam's learning rate for every method
FAIRGRAD_ALPHA = 1.0  # FairGrad's alpha on both sides (the plugin's default; torchjd's FairGrad has none)
GRADNORM_ALPHA = 1.5  # GradNorm's alpha on both sides (LibMTL's and the plugin's default)
LOSS_WEIGHTINGS = ("gradnorm",)  # plugins that read the loss values (GroupStats.losses)


def plugin_spec(aggregator: str) -> str | tuple[str, dict[str, float]]:
    """The Balancer plugin of an aggregator, with the options its anchor uses. LibMTL's GradNorm
    learns its weights as parameters of the model, stepped by the model's Adam (lr ``LR``): the
    plugin's own Adam gets the same learning rate."""
    options = {"fairgrad": {"alpha": FAIRGRAD_ALPHA}, "gradnorm": {"alpha": GRADNORM_ALPHA, "lr": LR}}
    return (aggregator, options[aggregator]) if aggregator in options else aggregator


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
        self.params: list[Tensor] = list(self.net.parameters())
        self.inner = torch.optim.Adam(self.params, lr=LR)
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
        """Takes one step (seeded, for the random orders of PCGrad) and returns what Adam received;
        called again, the same for the next step."""
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
        self.balancer = Balancer(self.inner, plugins=[plugin_spec(aggregator)])
        self.opt = self.balancer

    def backward(self) -> None:
        if self.data.scenario == "groups" and self.aggregator in LOSS_WEIGHTINGS:
            for i in range(K):  # opt.backward records the loss value, which a loss weighting reads
                self.balancer.backward({f"g{i}": group_loss(self.net, self.data, i)})
        elif self.data.scenario == "groups":
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
        self.balancer = Balancer(self.inner, plugins=[plugin_spec(aggregator)], model=self.net)
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
        self.balancer = Balancer(self.inner, plugins=[plugin_spec(aggregator)], model=self.net)
        self.opt = self.balancer

    def backward(self) -> None:
        self.balancer.backward_tasks({f"g{i}": loss for i, loss in enumerate(split_losses(self.net, self.data))})


def torchjd_aggregator(aggregator: str) -> nn.Module:
    """torchjd's aggregator of that name, with the options the Balancer's plugin uses."""
    aggregation = importlib.import_module("torchjd.aggregation")
    if aggregator == "fairgrad":
        return aggregation.FairGrad(alpha=FAIRGRAD_ALPHA)
    names = {"upgrad": "UPGrad", "mgda": "MGDA", "pcgrad": "PCGrad", "config": "ConFIG"}
    return getattr(aggregation, names[aggregator])()


class TorchjdStep(Method):
    """torchjd's documented path; ``all_params`` forces ``autojac.backward`` on every parameter."""

    def __init__(self, data: Data, aggregator: str, gramopt: bool = False, all_params: bool = False) -> None:
        super().__init__(data, aggregator)
        self.aggregation = torchjd_aggregator(aggregator)
        self.gramopt = gramopt
        self.mtl = data.scenario == "heads" and not all_params

    def backward(self) -> None:
        autojac = importlib.import_module("torchjd.autojac")
        losses, features = joint_losses(self.net, self.data)
        if self.mtl:
            autojac.mtl_backward(losses, features=features)
            shared: list[Tensor] = list(self.net.trunk.parameters())
        else:
            autojac.backward(losses)
            shared = self.params
        autojac.jac_to_grad(shared, self.aggregation, optimize_gramian_computation=self.gramopt)


class PtoStep(Method):
    def __init__(self, data: Data, aggregator: str) -> None:
        super().__init__(data, aggregator)
        pcgrad = importlib.import_module("pytorch_optimizer").PCGrad
        self.pto = pcgrad(self.inner, reduction="sum")
        self.opt = self.pto

    def backward(self) -> None:
        self.pto.pc_backward(split_losses(self.net, self.data))
