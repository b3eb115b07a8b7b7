"""The ``installed`` fixture of the registry tests (test_registry_*.py)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable

import pytest

from tests.balancer.contract.registry_fakes import OWN, FakeDistribution


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``installed(*fake_distributions)``: the environment holds this project plus those packages,
    in that order. ``installed(..., own=False)`` leaves this project out."""

    def install(*fakes: FakeDistribution, own: bool = True) -> None:
        dists = [importlib.metadata.distribution(OWN)] if own else []
        dists.extend(fakes)
        monkeypatch.setattr(importlib.metadata, "distributions", lambda: iter(dists))

    monkeypatch.delenv("BALANCER_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("BALANCER_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    return install
