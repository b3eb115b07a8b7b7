"""Fixtures shared by the plugin tests: the anchor libraries (imported for comparison only, in tests
marked ``anchors``), the direction of a plugin's weights, a real model's step."""

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
    if "LibMTL.weighting" in sys.modules:
        return sys.modules["LibMTL.weighting"]
    spec = importlib.util.find_spec("LibMTL")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("LibMTL is not installed (`pip install --no-deps LibMTL==1.1.5`).")
    if "LibMTL" not in sys.modules:
        package = types.ModuleType("LibMTL")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["LibMTL"] = package
    return importlib.import_module("LibMTL.weighting")


def _require_anchors_marker(request: pytest.FixtureRequest) -> None:
    """The anchor comparisons are one marked set (``-m anchors`` / ``-m "not anchors"``): a test that
    uses an anchor library without the marker would silently escape the selection."""
    if request.node.get_closest_marker("anchors") is None:
        pytest.fail(f"{request.node.nodeid} uses an anchor library: mark it @pytest.mark.anchors.")


@pytest.fixture
def libmtl(request):
    """The ``LibMTL.weighting`` module (LibMTL 1.1.5); only for tests marked ``anchors``."""
    _require_anchors_marker(request)
    return _load_libmtl_weighting()


@pytest.fixture
def torchjd_aggregation(request):
    """The ``torchjd.aggregation`` module (torchjd 0.18); only for tests marked ``anchors``."""
    _require_anchors_marker(request)
    return pytest.importorskip("torchjd.aggregation")


@pytest.fixture
def scalarization(request):
    """The ``torchjd.scalarization`` module (torchjd 0.18); only for tests marked ``anchors``."""
    _require_anchors_marker(request)
    return pytest.importorskip("torchjd.scalarization")


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


@pytest.fixture
def real_model_step(make_model, make_batches, group_loss, group_gradients):
    """``real_model_step(plugins, lr)``: one ``Balancer(SGD(lr), plugins)`` step of the shared float64
    test model on the shared group batches. Returns the parameter change ``before - after`` (the
    update, ``lr`` times the combined direction) and the group gradient rows ``[k, n]`` it started from."""
    import torch

    from balancer import Balancer

    def run(plugins, lr):
        model = make_model(dtype=torch.float64)
        params = list(model.parameters())
        before = torch.cat([p.detach().reshape(-1).clone() for p in params])
        losses = {name: group_loss(model, batch) for name, batch in make_batches(dtype=torch.float64).items()}
        grads = group_gradients(losses.values(), params)
        opt = Balancer(torch.optim.SGD(params, lr=lr), plugins=plugins)
        opt.backward(losses)
        opt.step()
        return before - torch.cat([p.detach().reshape(-1) for p in params]), grads

    return run


@pytest.fixture(scope="session")
def dual_cone_projection():
    """``project(a, g)``: argmin ‖x - g‖ subject to ``a x ≥ 0``, by SLSQP in the parameter space (the
    definition UPGrad and DualProj project with, not the Gram dual they solve)."""
    import torch
    from scipy.optimize import minimize

    def project(a, g):
        a, g = a.numpy(), g.numpy()
        res = minimize(
            lambda x: 0.5 * ((x - g) ** 2).sum(),
            g,
            jac=lambda x: x - g,
            constraints={"type": "ineq", "fun": lambda x: a @ x, "jac": lambda x: a},
            method="SLSQP",
            options={"ftol": 1e-16, "maxiter": 1000},
        )
        return torch.from_numpy(res.x)

    return project
