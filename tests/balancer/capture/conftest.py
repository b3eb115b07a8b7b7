"""Fixtures of the capture tests."""

from __future__ import annotations

import pytest

import balancer.capture.layer_gram as layer_gram


@pytest.fixture(params=layer_gram.FORMS)
def path(request, monkeypatch):
    """Every weight's Gram in one form: each must be exact on its own."""
    monkeypatch.setattr(layer_gram, "choose_form", lambda *a: request.param)
    return request.param
