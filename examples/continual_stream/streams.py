"""Class-incremental streams for ``examples/online_continual.py``: MNIST-1D and sklearn's digits.

Both arrive as 5 tasks of 2 classes; the class order, the stream order and everything random in a
run follow its seed, so methods run on the same seed share them (paired comparisons).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

TASKS, PER_TASK, CLASSES = 5, 2, 10


@dataclass
class Stream:
    """Train and test tensors of one seed, labels relabelled so that task t holds classes 2t, 2t+1."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    shift: int  # largest circular shift of the 1-D augmentation (0: noise only)


def mnist1d_arrays(samples: int = 20_000) -> dict[str, np.ndarray]:
    """MNIST-1D (Greydanus 2020) generated offline by the ``mnist1d`` package with its default
    arguments (seed 42, 80/20 split, length 40), only ``num_samples`` raised to 20k: 16k train, 4k test.
    ``make_dataset`` generates; it never downloads (``get_dataset`` would)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise SystemExit(f"MNIST-1D needs the mnist1d package ({exc}). Fix: pip install mnist1d, or --quick.") from exc

    args = get_dataset_args()
    args.num_samples = samples
    data = make_dataset(args)
    return {k: data[k] for k in ("x", "y", "x_test", "y_test")}


def digits_arrays() -> dict[str, np.ndarray]:
    """sklearn's 8x8 digits (bundled, 1797 images) in [0, 1], a fixed 70/30 split per class."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    train = np.zeros(len(y), dtype=bool)
    for c in range(CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))
        train[idx[: int(0.7 * len(idx))]] = True
    x = x / 16.0
    return {"x": x[train], "y": y[train], "x_test": x[~train], "y_test": y[~train]}


def make_stream(name: str, arrays: dict[str, np.ndarray], seed: int) -> Stream:
    """The seed's class order applied to ``arrays`` (from :func:`mnist1d_arrays` or :func:`digits_arrays`)."""
    relabel = np.empty(CLASSES, dtype=np.int64)
    relabel[np.random.default_rng(seed).permutation(CLASSES)] = np.arange(CLASSES)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    g = lambda a: torch.tensor(relabel[a], dtype=torch.long)  # noqa: E731
    shift = 3 if name == "mnist1d" else 0
    return Stream(name, f(arrays["x"]), g(arrays["y"]), f(arrays["x_test"]), g(arrays["y_test"]), shift)


def augment(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """One random view: a circular shift by up to ``shift`` positions (1-D signals), an amplitude
    scale in [0.9, 1.1] and Gaussian noise of sd 0.05. GSA flips images horizontally for its
    second view; reversing a 1-D digit changes it, so both views are independent draws of this."""
    rows = x.shape[0]
    if shift:
        offsets = torch.randint(-shift, shift + 1, (rows,), generator=generator)
        index = (torch.arange(x.shape[1])[None, :] - offsets[:, None]) % x.shape[1]
        x = x.gather(1, index)
    scale = 0.9 + 0.2 * torch.rand(rows, 1, generator=generator)
    return x * scale + 0.05 * torch.randn(x.shape, generator=generator)


def two_views(x: Tensor, y: Tensor, shift: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """GSA trains on two views of every row: ``[view1; view2]`` and the labels twice."""
    return torch.cat([augment(x, shift, generator), augment(x, shift, generator)]), torch.cat([y, y])
