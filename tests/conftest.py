"""Shared fixtures: a small model and data with groups of very different gradient scale, and the
device the device-aware tests run on.

``BALANCER_TEST_DEVICE=cuda python -m pytest ...`` runs them on the GPU (default ``cpu``): the
``device`` fixture, the plugin suite, the core step tests and the no-host-sync checks then put
their tensors there. Tests marked ``cpu_only`` are skipped on another device, with their reason.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE_ENV = "BALANCER_TEST_DEVICE"


def selected_device() -> torch.device:
    """The device named by ``BALANCER_TEST_DEVICE`` (default ``cpu``)."""
    return torch.device(os.environ.get(DEVICE_ENV, "cpu").strip() or "cpu")


def pytest_configure(config: pytest.Config) -> None:
    device = selected_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"{DEVICE_ENV}={os.environ[DEVICE_ENV]} but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}). Unset {DEVICE_ENV} to test on the CPU, or run where a GPU is visible."
        )
    if device.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"{DEVICE_ENV}={os.environ[DEVICE_ENV]}: use `cpu` or `cuda` (or `cuda:N`).")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if selected_device().type == "cpu":
        return
    for item in items:
        marker = item.get_closest_marker("cpu_only")
        if marker is not None:
            reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "runs on the CPU only")
            item.add_marker(pytest.mark.skip(reason=f"{DEVICE_ENV}={selected_device()}: {reason}"))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where device-aware tests put their tensors: ``BALANCER_TEST_DEVICE`` (default ``cpu``)."""
    return selected_device()


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def plugin_entries(plugin: str, first_group: str = "g0") -> list:
    """Plugin entries that run ``plugin``: with :func:`required_options`, after ``rlw`` when it
    transforms the weights of an earlier plugin (``crmogm``)."""
    entry = (plugin, required_options(plugin, first_group))
    return [("rlw", {}), entry] if plugin == "crmogm" else [entry]


def required_options(plugin: str, first_group: str = "g0") -> dict:
    """Options for the built-in plugins that cannot run with their defaults (pcd needs its primary
    group, constant its weights), naming ``first_group`` (``g0`` in make_batches, ``group0`` in
    ``random_stats``); ``{}`` for the others."""
    return {
        "pcd": {"primary": first_group},
        "constant": {"weights": {first_group: 2.0}, "default": 0.5},
    }.get(plugin, {})


def make_batches(seed: int = 0, groups: int = 3, size: int = 8, dtype: torch.dtype = torch.float32):
    """One (x, y) batch per group; group i's targets are scaled by 10**i, so gradient norms differ."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(groups):
        x = torch.randn(size, 6, generator=gen, dtype=dtype)
        y = torch.randn(size, 3, generator=gen, dtype=dtype) * 10.0**i
        out[f"g{i}"] = (x, y)
    return out


def group_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.fixture
def model() -> torch.nn.Module:
    return make_model()


@pytest.fixture
def batches():
    return make_batches()


@pytest.fixture(name="make_model")
def _make_model_fixture():
    return make_model


@pytest.fixture(name="make_batches")
def _make_batches_fixture():
    return make_batches


@pytest.fixture(name="group_loss")
def _group_loss_fixture():
    return group_loss


def group_gradients(losses, params) -> torch.Tensor:
    """``[k, n]``: row i is the flattened gradient of the i-th loss w.r.t. ``params`` (graph kept)."""
    params = list(params)
    return torch.stack(
        [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)]) for loss in losses]
    )


@pytest.fixture(name="group_gradients")
def _group_gradients_fixture():
    return group_gradients
