"""Each aggregator against the pinned table (``pinned.py``): weights and directions on fixed gradient
matrices, generated once from torchjd 0.18 and float64 scipy references (``anchors.py``). These run
without the anchor libraries, on the test device; the ``anchors`` test regenerates the table and
compares it with the stored one."""

from __future__ import annotations

import pytest
import torch

from balancer.plugins import BUILTIN_PLUGINS
from tests.plugins.cases import stats_of
from tests.plugins.pinned import MATRICES, PINNED

F64 = torch.float64
PLUGINS = {cls.name: cls for cls in BUILTIN_PLUGINS}
ENTRIES = [
    pytest.param(name, matrix, id=f"{name}-{matrix}") for name, entry in PINNED.items() for matrix in entry["cases"]
]


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, scale: float, what: str) -> None:
    """Relative to the expected vector, with an absolute floor scaled by the inputs: a coordinate that
    cancels to ~0 is compared to rounding of the numbers it came from, not to rtol of itself."""
    err = (actual - expected).norm()
    assert err <= rtol * expected.norm() + 1e-12 * scale, f"{what}: {actual.tolist()} vs pinned {expected.tolist()}"


@pytest.mark.parametrize(("name", "matrix"), ENTRIES)
def test_weights_and_direction_equal_the_pinned_table(name, matrix, device):
    entry = PINNED[name]
    a = torch.tensor(MATRICES[matrix], dtype=F64)
    pinned_w, pinned_d = entry["cases"][matrix]
    plugin = PLUGINS[name](entry["options"])
    k = a.shape[0]
    w, _ = plugin.update(stats_of(a, device), torch.ones(k, dtype=F64, device=device), plugin.init())
    assert w.device.type == device.type
    w = w.cpu()
    rtol = max(10 * entry["accuracy"], 1e-7)  # the source's accuracy, and solver noise here
    norms = a.norm(dim=1)
    _close(w @ a, torch.tensor(pinned_d, dtype=F64), rtol, float(norms.max()), f"{name} direction on {matrix}")
    if pinned_w is not None:
        # A weight times ‖g_i‖ is what the direction is made of: the floor is relative to the largest term.
        _close(w * norms, torch.tensor(pinned_w, dtype=F64) * norms, rtol, float(norms.max()), f"{name} weights")


def test_the_table_covers_every_aggregator():
    assert set(PINNED) == {
        "upgrad",
        "dualproj",
        "imtl_g",
        "aligned_mtl",
        "nash_mtl",
        "pcgrad",
        "gradvac",
        "mgda",
        "cagrad",
    }
    assert all(len(entry["cases"]) >= 3 for entry in PINNED.values())


@pytest.mark.anchors
@pytest.mark.cpu_only("the anchors compute on the CPU (numpy, scipy, cvxpy)")
@pytest.mark.parametrize(("name", "matrix"), ENTRIES)
def test_pinned_table_equals_the_anchors(name, matrix):
    """Regenerates the entry from its source (``python -m tests.plugins.anchors`` writes the whole table)."""
    pytest.importorskip("torchjd.aggregation")
    from tests.plugins.anchors import compute

    pinned_w, pinned_d = PINNED[name]["cases"][matrix]
    w, d = compute(name, matrix)
    a = torch.tensor(MATRICES[matrix], dtype=F64)
    rtol, scale = PINNED[name]["accuracy"], float(a.norm(dim=1).max())
    _close(d, torch.tensor(pinned_d, dtype=F64), rtol, scale, f"{name} direction on {matrix}")
    assert (w is None) == (pinned_w is None)
    if w is not None:
        _close(w, torch.tensor(pinned_w, dtype=F64), rtol, 1.0, f"{name} weights on {matrix}")
