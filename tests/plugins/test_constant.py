"""constant: fixed weights by group name (torchjd 0.18's Constant keyed by name), the default for unnamed groups,
the error for an unknown group; torchjd's Sum, Mean and Random as they are covered here."""

from __future__ import annotations

import pydantic
import pytest
import torch

from balancer import GroupStats
from balancer.contract.chain import Chain
from balancer.errors import PluginError
from balancer.plugins import RLW, Constant, TaskNorm

F64 = torch.float64


def _update(plugin: Constant, names: list[str], gram: torch.Tensor | None = None) -> torch.Tensor:
    gram = torch.eye(len(names), dtype=F64) if gram is None else gram
    w, _ = plugin.update(GroupStats.from_gram(gram, names), torch.ones(len(names), dtype=F64), plugin.init())
    return w


def test_weights_follow_the_names_in_any_order() -> None:
    plugin = Constant(weights={"math": 2.0, "code": -0.5, "chat": 0.0})
    assert _update(plugin, ["math", "code", "chat"]).tolist() == [2.0, -0.5, 0.0]
    assert _update(plugin, ["chat", "math"]).tolist() == [0.0, 2.0]


def test_unknown_group_is_an_error_unless_there_is_a_default() -> None:
    with pytest.raises(
        PluginError, match=r"no weight for groups \['poetry'\] \(it has weights for \['code', 'math'\]\)"
    ):
        _update(Constant(weights={"math": 2.0, "code": 1.0}), ["math", "poetry"])
    assert _update(Constant(weights={"math": 2.0}, default=0.25), ["poetry", "math"]).tolist() == [0.25, 2.0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"weights": {}}, "no default"),
        ({"weights": {"a": 1.0, "b": 1.0}}, "every weight"),
        ({"weights": {}, "default": 1.0}, "every weight"),
        ({"weights": {"a": float("inf")}}, "finite"),
        ({"weights": {"a": 2.0}, "default": float("nan")}, "finite"),
    ],
)
def test_meaningless_options_are_refused(options: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(pydantic.ValidationError, match=message):
        Constant(options)


def test_multiplies_the_incoming_weights() -> None:
    """After another plugin it scales that plugin's weights group by group (the chain's rule)."""
    gram = torch.diag(torch.tensor([1.0, 4.0, 16.0], dtype=F64))
    stats = GroupStats.from_gram(gram, ["a", "b", "c"])
    chain = Chain([TaskNorm(), Constant(weights={"a": 3.0, "b": 1.0, "c": 0.5})])
    w, _ = chain.run(stats, chain.init())
    alone, _ = Chain([TaskNorm()]).run(stats, {"task_norm": TaskNorm().init()})
    torch.testing.assert_close(w, alone * torch.tensor([3.0, 1.0, 0.5], dtype=F64), rtol=1e-15, atol=0)


@pytest.mark.anchors
def test_equals_torchjd_constant_mean_and_sum(torchjd_aggregation) -> None:
    a = torch.randn(4, 7, generator=torch.Generator().manual_seed(0), dtype=F64)
    names = ["w", "x", "y", "z"]
    values = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=F64)
    w = _update(Constant(weights=dict(zip(names, values.tolist(), strict=True))), names, a @ a.T)
    torch.testing.assert_close(w @ a, torchjd_aggregation.Constant(values)(a), rtol=1e-14, atol=1e-14)
    # Mean: the same weight for every group (a fixed number of groups); Sum: no plugin at all (weights 1)
    mean = _update(Constant(weights={}, default=0.25), names, a @ a.T)
    torch.testing.assert_close(mean @ a, torchjd_aggregation.Mean()(a), rtol=1e-14, atol=1e-14)
    ones, _ = Chain([]).run(GroupStats.from_gram(a @ a.T, names), {})
    torch.testing.assert_close(ones @ a, torchjd_aggregation.Sum()(a), rtol=1e-14, atol=1e-14)


@pytest.mark.anchors
def test_rlw_draws_torchjds_random_weighting(torchjd_aggregation) -> None:
    """torchjd's Random is softmax of standard normal samples, as rlw (std 1): same distribution (the
    draws differ: rlw seeds by name and step). Checked on the means of many draws."""
    gram = torch.eye(3, dtype=F64)
    draws = torch.stack(
        [
            RLW().update(GroupStats.from_gram(gram, ["a", "b", "c"], step=t), torch.ones(3, dtype=F64), {})[0]
            for t in range(4000)
        ]
    )
    torch.manual_seed(0)
    ref = torch.stack([torchjd_aggregation.RandomWeighting()(torch.eye(3, dtype=F64)) for _ in range(4000)])
    torch.testing.assert_close(draws.sort(dim=1).values.mean(0), ref.sort(dim=1).values.mean(0), rtol=0, atol=0.01)
