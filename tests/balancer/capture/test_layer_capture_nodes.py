"""The private autograd node names :mod:`balancer.capture.autograd_nodes` relies on: every way
``F.linear`` appears in this torch's graphs is recognised (the canary for a torch upgrade)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from balancer import CaptureError
from balancer.capture.autograd_nodes import find_linear_calls


def _roles(layer: nn.Linear, out: torch.Tensor, batch: int | None) -> set[str]:
    owners = {id(layer.weight): ("weight", "weight")}
    if layer.bias is not None:
        owners[id(layer.bias)] = ("bias", "bias")
    calls = find_linear_calls([out.sum().grad_fn], owners, batch)
    return {role for _, _, uses in calls for _, role in uses}


@pytest.mark.parametrize("shape", [(4, 3), (4, 5, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
def test_every_form_of_a_linear_call_is_recognised(shape, bias, autocast):
    layer = nn.Linear(3, 2, bias=bias)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(torch.randn(*shape))
    assert _roles(layer, out, shape[0]) == ({"weight", "bias"} if bias else {"weight"})


def test_a_parameter_used_outside_a_linear_call_is_named():
    layer = nn.Linear(3, 2)
    out = layer(torch.randn(4, 3)).sum() + layer.weight.square().sum()
    with pytest.raises(CaptureError, match=r"\['weight'\] receive gradient outside an nn.Linear call"):
        _roles(layer, out, None)


def test_a_sequence_first_output_view_is_refused():
    layer = nn.Linear(3, 2)
    out = layer(torch.randn(5, 4, 3))  # [T, B, d] with B = 4 samples
    with pytest.raises(CaptureError, match=r"shape \(5, 4, 2\) for 4 samples"):
        _roles(layer, out, 4)
