"""GroupStats: norms, cosines and subsets from the Gram matrix."""

from __future__ import annotations

import pytest
import torch

from balancer import GroupStats


def _stats():
    grads = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [-6.0, -8.0, 0.0]], dtype=torch.float64)
    return GroupStats.from_gram(grads @ grads.T, ["a", "zero", "b"], losses=[1.0, 2.0, 3.0], step=7)


def test_norms_and_cosines():
    stats = _stats()
    assert stats.norms.tolist() == [5.0, 0.0, 10.0]
    assert stats.cosines.tolist() == [[1.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 1.0]]  # 0 for a zero gradient


def test_select_reorders_every_field():
    stats = _stats().select([2, 0])
    assert stats.names == ("b", "a")
    assert stats.gram.tolist() == [[100.0, -50.0], [-50.0, 25.0]]
    assert stats.losses.tolist() == [3.0, 1.0]
    assert stats.step == 7


def test_to_dict_is_plain_python():
    out = _stats().to_dict()
    assert out["names"] == ["a", "zero", "b"] and out["norms"] == [5.0, 0.0, 10.0] and "weights" not in out


def test_from_gram_validates_its_input():
    with pytest.raises(ValueError, match="square matrix"):
        GroupStats.from_gram(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="3 names for a 2x2"):
        GroupStats.from_gram(torch.eye(2), ["a", "b", "c"])
