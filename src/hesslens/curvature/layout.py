"""Where an operator's elements lie: the flat vector of a block of pieces (whole parameters or
slices of them) against the flat vector of the parameters its products differentiate.

An operator's products run over whole parameters (``names``, in model order: the *width*); its
vector holds only its pieces' elements (``dim``), in piece order. When the pieces are the whole
parameters in model order the two vectors are the same and no index is built; otherwise
:meth:`FlatLayout.widen` puts a vector into the width (zeros elsewhere) and
:meth:`FlatLayout.narrow` takes it back.

Example:
    >>> import torch
    >>> from hesslens.curvature.blocks import ParamSlice
    >>> shapes = {"w": torch.Size([2, 3]), "b": torch.Size([2])}
    >>> layout = FlatLayout([ParamSlice("w", 0, 1, 2)], ["w", "b"], shapes)
    >>> layout.names, layout.dim, layout.identity
    (['w'], 3, False)
    >>> layout.widen(torch.ones(1, 3)).tolist()
    [[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from hesslens.curvature.blocks import Blocks, ParamSlice, block_flat_indices
from hesslens.linalg.operator import product_eps


class FlatLayout:
    """The flat vector of ``pieces`` among the ``order``ed parameters of ``shapes``."""

    def __init__(self, pieces: Sequence[ParamSlice], order: Sequence[str],
                 shapes: Mapping[str, torch.Size], device: torch.device | str = "cpu") -> None:
        wanted = {p.param for p in pieces}
        self.pieces = list(pieces)
        self.names = [n for n in order if n in wanted]
        self.shapes = {n: shapes[n] for n in self.names}
        self.width = sum(math.prod(s) for s in self.shapes.values())
        canonical = [p.canonical(self.shapes[p.param]) for p in pieces]
        # Whole parameters in model order: the operator's vector is the parameters' own, and no
        # index tensor (8 bytes an element) is ever built.
        self.identity = (all(p.dim is None for p in canonical)
                         and [p.param for p in canonical] == self.names)
        self.dim = sum(p.numel(self.shapes[p.param]) for p in canonical)
        self.index = None if self.identity else block_flat_indices(
            pieces, self.shapes).to(device)
        starts = np.cumsum([0] + [p.numel(self.shapes[p.param]) for p in canonical]).tolist()
        self._ranges = {p: (a, b) for p, a, b in zip(canonical, starts, starts[1:])}

    def widen(self, V: Tensor) -> Tensor:
        """``(k, dim)`` vectors as ``(k, width)`` ones, zero outside the pieces."""
        if self.identity:
            return V
        W = V.new_zeros(V.shape[0], self.width)
        W[:, self.index] = V
        return W

    def narrow(self, W: Tensor) -> Tensor:
        """``(k, width)`` vectors restricted to the pieces, ``(k, dim)``."""
        return W if self.identity else W[:, self.index]

    def ranges(self, blocks: Blocks) -> dict[str, slice] | None:
        """Each block's contiguous range in the flat vector, or ``None`` when some block is not
        one range (a slice of a fused weight, blocks out of order)."""
        out = {}
        for layer, pieces in blocks.items():
            spans = [self._ranges.get(p.canonical(self.shapes[p.param]))
                     if p.param in self.shapes else None for p in pieces]
            if any(span is None for span in spans):
                return None
            if any(a[1] != b[0] for a, b in itertools.pairwise(spans)):
                return None
            out[layer] = slice(spans[0][0], spans[-1][1])
        return out

    def indices(self, blocks: Blocks) -> dict[str, Tensor]:
        """Where each block's elements lie in the flat vector (int64 indices)."""
        position = torch.full((self.width,), -1, dtype=torch.int64)
        if self.index is None:
            position = torch.arange(self.width)
        else:
            position[self.index.cpu()] = torch.arange(self.dim)
        out = {}
        for layer, pieces in blocks.items():
            idx = position[block_flat_indices(pieces, self.shapes)]
            out[layer] = idx[idx >= 0]
        return out


class Permuted:
    """``P A P^T`` for a coordinate permutation: makes the blocks of an operator whose blocks
    are not ranges of its vector contiguous (for the trace of every block)."""

    def __init__(self, op: object, perm: Tensor) -> None:
        self.op, self.perm = op, perm.to(op.device)
        self.inverse = torch.empty_like(self.perm)
        self.inverse[self.perm] = torch.arange(len(perm), device=op.device)
        self.dim, self.dtype, self.device = op.dim, op.dtype, op.device
        self.product_eps = product_eps(op)

    def matmat(self, V: Tensor) -> Tensor:
        V = V.to(device=self.device, dtype=self.dtype)
        return self.op.matmat(V[:, self.inverse])[:, self.perm]


def contiguous_blocks(dim: int, indices: Mapping[str, Tensor]
                      ) -> tuple[Tensor, dict[str, slice]]:
    """A permutation that puts the blocks' elements (``indices``) first, each block a range,
    the rest after them, and those ranges."""
    perm = torch.cat([*indices.values(), torch.zeros(0, dtype=torch.int64)])
    if len(perm) < dim:
        rest = torch.ones(dim, dtype=torch.bool)
        rest[perm] = False
        perm = torch.cat([perm, torch.nonzero(rest).flatten()])
    ranges, start = {}, 0
    for layer, idx in indices.items():
        ranges[layer] = slice(start, start + len(idx))
        start += len(idx)
    return perm, ranges
