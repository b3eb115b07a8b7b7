"""Which methods ``vs_anchors.py`` runs for each aggregator, and how to build one from its key.

A key is ``(aggregator, method)``; aggregator ``"-"`` for the sum baselines. torchjd has no
GradNorm (a loss weighting) and its ``optimize_gramian_computation`` needs a Gramian-based
aggregator, which ConFIG is not; LibMTL 1.1.5 has MGDA, PCGrad and GradNorm of these;
pytorch-optimizer has PCGrad.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from anchor_methods import (
    BalancerSamplesStep,
    BalancerStep,
    BalancerTasksStep,
    Data,
    Key,
    Method,
    PtoStep,
    SumGroupsStep,
    SumStep,
    TorchjdStep,
)
from anchor_methods_weighting import libmtl_step

AGGREGATORS = ("upgrad", "mgda", "pcgrad", "fairgrad", "config", "gradnorm")

Factory = Callable[[Data, str], Method]
METHODS: dict[str, Factory] = {
    "balancer": BalancerStep,
    "balancer-samples": BalancerSamplesStep,
    "balancer-tasks": BalancerTasksStep,
    "torchjd": TorchjdStep,
    "torchjd-gramopt": lambda data, agg: TorchjdStep(data, agg, gramopt=True),
    "libmtl": libmtl_step,
    "pto": PtoStep,
}


def balancer_paths(scenario: str) -> list[str]:
    """The Balancer's ways to capture the groups; the last one is the scenario's recommended path,
    which the time target applies to."""
    return ["balancer"] + (["balancer-tasks", "balancer-samples"] if scenario == "groups" else ["balancer-tasks"])


def methods_of(aggregator: str, scenario: str) -> list[str]:
    names = balancer_paths(scenario)
    if aggregator != "gradnorm":
        names += ["torchjd"] + ([] if aggregator == "config" else ["torchjd-gramopt"])
    names += ["libmtl"] if aggregator in ("mgda", "pcgrad", "gradnorm") else []
    names += ["pto"] if aggregator == "pcgrad" else []
    return names


def build(data: Data, key: Key) -> Method:
    aggregator, method = key
    baselines: dict[str, Factory] = {"sum": SumStep, "sum-groups": SumGroupsStep}
    return baselines[method](data, "-") if aggregator == "-" else METHODS[method](data, aggregator)


def all_keys(data: Data, aggregators: Sequence[str] = AGGREGATORS) -> list[Key]:
    baselines = [("-", "sum")] + ([("-", "sum-groups")] if data.scenario == "groups" else [])
    return baselines + [(agg, m) for agg in aggregators for m in methods_of(agg, data.scenario)]
