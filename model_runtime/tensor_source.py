"""Weights on demand: our parameter names mapped to a reader's tensors (q/k/v and gate/up fused as
they are read), and 2-D weights read a range of rows at a time so the quantizers never hold a
whole float matrix."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor


class LazyRows:
    """A 2-D weight in a file, read a range of rows at a time (`w[r0:r1]`): the quantizers walk
    big matrices (a 150k-row lm_head) chunk by chunk without ever holding the whole float tensor."""

    def __init__(self, shape: tuple[int, int], read: Callable[[int, int], Tensor]) -> None:
        self.shape = torch.Size(shape)
        self._read = read

    def __getitem__(self, rows: slice) -> Tensor:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("LazyRows reads contiguous row ranges only")
        return self._read(start, stop)


def _stacked_rows(parts: list[LazyRows]) -> Tensor | LazyRows:
    """Row-wise concatenation of lazily read matrices (the fused q/k/v or gate/up weight)."""
    k = parts[0].shape[1]
    if any(p.shape[1] != k for p in parts):
        return torch.cat([p[0:p.shape[0]] for p in parts], dim=0)
    starts = [0]
    for p in parts:
        starts.append(starts[-1] + p.shape[0])

    def read(r0: int, r1: int) -> Tensor:
        pieces = []
        for p, lo, hi in zip(parts, starts, starts[1:], strict=False):
            a, b = max(r0, lo), min(r1, hi)
            if a < b:
                pieces.append(p[a - lo:b - lo])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)

    return LazyRows((starts[-1], k), read)


class TensorSource:
    """name -> tensor on demand (ours), fusing q/k/v and gate/up as they are read."""

    def __init__(self, names: set[str], get: Callable[[str], Tensor], mapping: dict[str, list[str]],
                 rows: Callable[[str], LazyRows | None] | None = None) -> None:
        self.available = names
        self._get = get
        self._rows = rows
        self.mapping = mapping

    def lazy(self, ours: str) -> Tensor | LazyRows:
        """The weight as row-readable from the file when the format allows it (2-D source tensors;
        fused q/k/v or gate/up read across their sources), else the tensor itself. The quantizers
        read it a chunk of rows at a time and move each chunk to the device they quantize on."""
        srcs = self.mapping.get(ours, [ours])
        parts = [self._rows(s) for s in srcs] if self._rows is not None else [None]
        if any(p is None for p in parts):
            return self.get(ours)
        if len(parts) == 1:
            return cast(LazyRows, parts[0])  # not None: checked above
        return _stacked_rows([p for p in parts if p is not None])

    def has(self, ours: str) -> bool:
        srcs = self.mapping.get(ours, [ours])
        return all(s in self.available for s in srcs)

    def get(self, ours: str) -> Tensor:
        srcs = self.mapping.get(ours, [ours])
        parts = [self._get(s) for s in srcs]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
