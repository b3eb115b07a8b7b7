"""Fixtures shared by the plugin tests: the anchor libraries, imported for comparison only."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def _load_libmtl_weighting() -> types.ModuleType:
    """Imports ``LibMTL.weighting`` without ``LibMTL/__init__.py``, which needs torchvision.

    The weighting subpackage itself only needs torch, numpy and scipy, so a bare package
    object pointing at the installed folder is enough to import it.
    """
    spec = importlib.util.find_spec("LibMTL")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("LibMTL is not installed (`pip install --no-deps LibMTL==1.1.5`).")
    if "LibMTL" not in sys.modules:
        package = types.ModuleType("LibMTL")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["LibMTL"] = package
    return importlib.import_module("LibMTL.weighting")


@pytest.fixture(scope="session")
def libmtl():
    """The ``LibMTL.weighting`` module (LibMTL 1.1.5)."""
    return _load_libmtl_weighting()


@pytest.fixture(scope="session")
def torchjd_aggregation():
    """The ``torchjd.aggregation`` module (torchjd 0.18)."""
    return pytest.importorskip("torchjd.aggregation")


@pytest.fixture(autouse=True)
def _one_thread():
    """Plugin tests work on k×k matrices: thread start-up costs more than it saves, and on a
    shared 2-core machine it makes them several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def direction():
    """``direction(plugin, a, incoming=None, losses=None)``: the weights of the plugin's first update
    on the gradient rows ``a`` (``[k, n]``) and the direction ``Σ_i w_i a_i`` they give."""
    import torch

    from balancer import GroupStats

    def run(plugin, a, incoming=None, losses=None):
        stats = GroupStats.from_gram(a @ a.T, losses=losses)
        ones = torch.ones(a.shape[0], dtype=a.dtype)
        weights, _ = plugin.update(stats, ones if incoming is None else incoming, plugin.init())
        return weights, weights @ a

    return run
