"""How ``tests/plugins/pinned.py`` was made: each aggregator's direction on fixed gradient matrices,
from an anchor implementation (torchjd 0.18) or, where no anchor is exact, a float64 reference of
the paper's formula solved by scipy on the explicit vectors. Weights are recovered from the
direction by least squares where the rows are independent (there they are unique).

Regenerate (needs torchjd and scipy)::

    python -m tests.plugins.anchors > tests/plugins/pinned.py && ruff format tests/plugins/pinned.py

``test_pinned.py::test_pinned_table_equals_the_anchors`` (marker ``anchors``) recomputes every entry
and compares it with the stored one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import minimize

F64 = torch.float64

#: Small integer rows: their Gram matrices are exact in float64.
MATRICES: dict[str, list[list[float]]] = {
    "pair conflicting": [[3, 1, 0, 2], [-2, 2, 1, 0]],
    "pair aligned": [[1, 2, 2, 0], [2, 1, 0, 1]],
    "pair scaled": [[30, 10, 0, 20], [-1, 0, 1, 1]],
    "three": [[1, 2, 0, -1, 3], [0, -1, 2, 2, 1], [-2, 1, 1, 0, -1]],
    "four": [[2, -1, 0, 1, 3, 0], [-1, 2, 1, 0, -2, 1], [0, 1, -3, 2, 1, -1], [1, 0, 1, -1, 0, 2]],
    "rank2": [[1, 0, 2, 1], [0, 1, -1, 1], [1, 1, 1, 2]],  # row 3 = row 1 + row 2: weights not unique
}
PAIRS = ("pair conflicting", "pair aligned", "pair scaled")


def _torchjd_projection(kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(a: torch.Tensor) -> torch.Tensor:
        from torchjd._linalg import QuadprogProjector
        from torchjd.aggregation import DualProj, UPGrad

        projector = QuadprogProjector(norm_eps=0.0, reg_eps=0.0)  # the exact projection
        return {"upgrad": UPGrad, "dualproj": DualProj}[kind](projector=projector)(a)

    return run


def _torchjd(factory: Callable[[int], Callable[[torch.Tensor], torch.Tensor]]) -> Callable:
    return lambda a: factory(a.shape[0])(a)


def min_norm_point(a: torch.Tensor) -> torch.Tensor:
    """MGDA: the point of the convex hull of the rows closest to 0 (SLSQP, float64)."""
    an = a.numpy()
    k = an.shape[0]
    res = minimize(
        lambda w: ((w @ an) ** 2).sum(),
        np.full(k, 1.0 / k),
        jac=lambda w: 2 * an @ (w @ an),
        bounds=[(0, 1)] * k,
        constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 1000},
    )
    return torch.from_numpy(res.x @ an)


def cagrad_direction(a: torch.Tensor, c: float = 0.5) -> torch.Tensor:
    """CAGrad (no rescale): argmax over ‖d - g0‖ ≤ c‖g0‖ of min_i g_iᵀd (SLSQP over (d, t), float64)."""
    an = a.numpy()
    g0 = an.mean(0)
    rho = c * np.linalg.norm(g0)
    n = an.shape[1]
    res = minimize(
        lambda z: -z[-1],
        np.append(g0, 0.0),
        jac=lambda z: np.append(np.zeros(n), -1.0),
        constraints=[
            {"type": "ineq", "fun": lambda z: an @ z[:-1] - z[-1]},
            {"type": "ineq", "fun": lambda z: rho**2 - ((z[:-1] - g0) ** 2).sum()},
        ],
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 2000},
    )
    return torch.from_numpy(res.x[:-1])


def _aggregators() -> dict[str, tuple[dict, str, Callable[[torch.Tensor], torch.Tensor], tuple[str, ...], float]]:
    """name: (plugin options, source, direction of the rows, matrices, relative accuracy of the source)."""
    import torchjd.aggregation as tj

    every = tuple(MATRICES)
    full = tuple(m for m in MATRICES if m != "rank2")  # torchjd's exact projector needs a definite Gram
    return {
        "upgrad": ({}, "torchjd UPGrad, exact projector", _torchjd_projection("upgrad"), full, 1e-8),
        "dualproj": ({}, "torchjd DualProj, exact projector", _torchjd_projection("dualproj"), full, 1e-8),
        "imtl_g": ({}, "torchjd IMTLG", _torchjd(lambda k: tj.IMTLG()), PAIRS + ("three", "four"), 1e-8),
        "aligned_mtl": ({}, "torchjd AlignedMTL(scale_mode='min')", _torchjd(lambda k: tj.AlignedMTL()), every, 1e-8),
        "nash_mtl": ({}, "torchjd NashMTL, first step", _torchjd(lambda k: tj.NashMTL(n_tasks=k)), full, 1e-6),
        "pcgrad": ({}, "torchjd PCGrad (k=2: no order to draw)", _torchjd(lambda k: tj.PCGrad()), PAIRS, 1e-8),
        "gradvac": ({}, "torchjd GradVac(beta=0.5), first step, k=2", _torchjd(lambda k: tj.GradVac()), PAIRS, 1e-8),
        "mgda": ({}, "float64 min-norm point, SLSQP", min_norm_point, every, 1e-7),
        "cagrad": ({"rescale": 0}, "float64 max-min problem, SLSQP (c=0.5)", cagrad_direction, every, 1e-6),
    }  # fmt: skip


def weights_of(a: torch.Tensor, direction: torch.Tensor) -> torch.Tensor | None:
    """The unique ``w`` with ``wᵀa = direction`` when the rows are independent, else ``None``."""
    if torch.linalg.matrix_rank(a) < a.shape[0]:
        return None
    return torch.linalg.lstsq(a.T, direction[:, None]).solution[:, 0]


def compute(name: str, matrix: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(weights, direction)`` of aggregator ``name`` on ``MATRICES[matrix]`` from its anchor."""
    _, _, direction_of, _, _ = _aggregators()[name]
    a = torch.tensor(MATRICES[matrix], dtype=F64)
    torch.manual_seed(0)  # torchjd's PCGrad and GradVac draw their orders from the global RNG
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # cvxpy's "not DPP" notice, from torchjd's NashMTL
        d = direction_of(a).to(F64)
    return weights_of(a, d), d


def _table() -> dict[str, dict]:
    table = {}
    for name, (options, source, _, matrices, accuracy) in _aggregators().items():
        entries = {}
        for matrix in matrices:
            w, d = compute(name, matrix)
            entries[matrix] = (None if w is None else w.tolist(), d.tolist())
        table[name] = {"options": options, "source": source, "accuracy": accuracy, "cases": entries}
    return table


def main() -> None:
    print('"""Pinned weights and directions of each aggregator on fixed gradient matrices (``MATRICES``).')
    print()
    print("Generated once by ``python -m tests.plugins.anchors > tests/plugins/pinned.py`` (torchjd 0.18 and")
    print("float64 scipy references, see ``anchors.py``); do not edit by hand. ``weights`` is None where the")
    print('rows are dependent (the weights are not unique there; the direction is)."""')
    print()
    print("MATRICES = " + repr(MATRICES))
    print()
    print("PINNED = " + repr(_table()))


if __name__ == "__main__":
    main()
