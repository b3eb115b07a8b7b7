"""Plugin state keyed by group name, so it survives groups that change order, appear or vanish.

Two layouts, both keyed by name and both read back by ``torch.load(weights_only=True)``:

- :data:`ByName`, a dict from group name to a 0-d tensor (``task_norm``'s EMA norms,
  ``nash_mtl``'s last weights): read with :func:`gather_by_name`, written with
  :func:`scatter_by_name`;
- ``names`` (every group seen so far, in order of first appearance) next to tensors whose
  leading dimensions follow that list (``dwa``, ``famo``, ``gradvac``'s ``m×m`` targets):
  :class:`NamedIndex` pads them for new names, takes this step's entries and puts them back.

Groups absent from a step keep their entries as they are. The lookups are Python work on the
names: no device tensor is read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import torch
from torch import Tensor

from balancer.contract.plugin import InvalidStateError

__all__ = [
    "ByName",
    "NamedIndex",
    "check_named_state",
    "check_nonnegative",
    "check_scalars_by_name",
    "gather_by_name",
    "scatter_by_name",
]

ByName: TypeAlias = dict[str, Tensor]
"""Per-group values in a plugin state: group name -> 0-d float tensor."""


def gather_by_name(stored: Mapping[str, Tensor], names: Sequence[str], fallback: Tensor) -> Tensor:
    """``[k]`` values of the groups ``names``: the stored one, or ``fallback[i]`` for a name not stored,
    converted to ``fallback``'s dtype and device."""
    return torch.stack([stored.get(n, f).to(fallback) for n, f in zip(names, fallback.unbind(), strict=True)])


def scatter_by_name(stored: Mapping[str, Tensor], names: Sequence[str], values: Tensor) -> ByName:
    """A copy of ``stored`` with the groups ``names`` set to the entries of ``values`` (others kept)."""
    return {**stored, **dict(zip(names, values.unbind(), strict=True))}


def check_named_state(state: Mapping[str, Any], vectors: Sequence[str] = (), matrices: Sequence[str] = ()) -> None:
    """Raises :class:`~balancer.contract.plugin.InvalidStateError` unless ``state["names"]`` lists distinct
    group names and every tensor of ``vectors`` (``matrices``) has one entry (row and column) per name."""
    names = state["names"]
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise InvalidStateError("names", f"found {names!r}; expected distinct group names (str)")
    m = len(names)
    for key, shape in [(k, (m,)) for k in vectors] + [(k, (m, m)) for k in matrices]:
        if tuple(state[key].shape) != shape:
            raise InvalidStateError(
                key, f"found shape {tuple(state[key].shape)}; expected {shape}, one entry per name in `names` ({m})"
            )


def check_scalars_by_name(values: object, path: str) -> None:
    """Raises :class:`~balancer.contract.plugin.InvalidStateError` unless ``values`` maps group names to
    0-dimensional floating tensors that are not negative (an EMA of norms, bargaining weights)."""
    if not isinstance(values, dict):
        raise InvalidStateError(path, f"found {values!r}; expected a dict of group names")
    for name, value in values.items():
        where = f"{path}.{name}"
        if not isinstance(name, str) or not isinstance(value, Tensor):
            raise InvalidStateError(where, f"found {value!r}; expected a group name mapped to a 0-d float tensor")
        if value.dim() != 0 or not value.is_floating_point():
            raise InvalidStateError(
                where, f"found a {value.dtype} tensor of shape {tuple(value.shape)}; expected 0-d float"
            )
        check_nonnegative(value, where)


def check_nonnegative(value: Tensor | int, path: str) -> None:
    """Raises :class:`~balancer.contract.plugin.InvalidStateError` at the first negative entry of ``value``."""
    if isinstance(value, int):  # a Python count, of any size
        if value < 0:
            raise InvalidStateError(path, f"found {value}; this count cannot be negative")
        return
    negative = value < 0
    if bool(negative.any()):
        index = [int(i) for i in negative.nonzero()[0]]
        where = f"{path}[{', '.join(map(str, index))}]" if index else path
        raise InvalidStateError(where, f"found {value[tuple(index)].item()}; this value cannot be negative")


class NamedIndex:
    """Where this step's groups sit in the stored ``names`` list (extended with the new ones)."""

    def __init__(self, stored: Sequence[str], current: Sequence[str], device: torch.device) -> None:
        known = set(stored)
        self.names = list(stored) + [n for n in current if n not in known]
        self.added = len(self.names) - len(stored)
        position = {n: i for i, n in enumerate(self.names)}
        self.index = torch.tensor([position[n] for n in current], dtype=torch.long).to(device)

    def vector(self, stored: Tensor, fill: float, device: torch.device) -> Tensor:
        """``stored`` (over the old names) padded with ``fill`` for the new names, on ``device``."""
        stored = stored.to(device=device, dtype=torch.float64)
        return torch.cat([stored, torch.full((self.added,), fill, dtype=torch.float64, device=device)])

    def matrix(self, stored: Tensor, fill: float, device: torch.device) -> Tensor:
        """``stored`` (old names × old names) padded with ``fill`` rows and columns for the new names."""
        stored = stored.to(device=device, dtype=torch.float64)
        m = len(self.names)
        out = torch.full((m, m), fill, dtype=torch.float64, device=device)
        old = m - self.added
        out[:old, :old] = stored  # a fresh tensor: the stored state is not modified
        return out

    def take(self, full: Tensor) -> Tensor:
        """The current groups' entries of a padded vector."""
        return full.index_select(0, self.index)

    def take_matrix(self, full: Tensor) -> Tensor:
        """The current groups' block of a padded matrix."""
        return full.index_select(0, self.index).index_select(1, self.index)

    def put(self, full: Tensor, values: Tensor) -> Tensor:
        """A copy of the padded vector ``full`` with the current groups' entries set to ``values``."""
        return full.index_copy(0, self.index, values)

    def put_matrix(self, full: Tensor, values: Tensor) -> Tensor:
        """A copy of the padded matrix ``full`` with the current groups' block set to ``values``."""
        return full.index_put((self.index[:, None], self.index[None, :]), values)
