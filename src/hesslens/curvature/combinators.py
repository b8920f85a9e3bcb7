"""Operators made of others on the same parameters and data: linear combinations
``sum_i c_i A_i``, such as the residual ``H - G`` of the Gauss-Newton split.

A combination is an operator like any other (blocks, estimators); its product is the
combination of its operands' products, and its blocks are the combinations of theirs.

Example:
    >>> import torch, hesslens as hl
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> H = hl.Hessian(net, torch.nn.functional.cross_entropy,
    ...                (torch.randn(16, 3), torch.randint(0, 2, (16,))))
    >>> R = Difference(H, H.gauss_newton())
    >>> v = torch.randn(H.dim)
    >>> torch.allclose(R.hvp(v), H.hvp(v) - H.gauss_newton().hvp(v), atol=1e-6)
    True
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from hesslens.curvature.base import CurvatureOperator
from hesslens.curvature.blocks import Blocks, ParamSlice
from hesslens.errors import HesslensInputError


class Combination(CurvatureOperator):
    """``sum_i c_i A_i`` for ``terms`` ``[(c_i, A_i)]``: operators on the same parameters (or
    slices) of the same model and data."""

    def __init__(self, terms: Sequence[tuple[float, CurvatureOperator]],
                 label: str | None = None) -> None:
        terms = [(float(c), op) for c, op in terms]
        if not terms:
            raise HesslensInputError("a combination needs at least one operator")
        first = terms[0][1]
        for _, op in terms[1:]:
            if op._shared is not first._shared or op._layout.pieces != first._layout.pieces:
                raise HesslensInputError(
                    f"{type(op).__name__} and {type(first).__name__} do not cover the same "
                    "parameters of the same model and data: derive one from the other (e.g. "
                    "H.gauss_newton(), H.block(name)) before combining them")
        self._terms = terms
        self._attach(first._shared, first._blocks, first._layout.pieces,
                     label if label is not None else first.label)

    def _apply(self, V: Tensor, out: Tensor | None = None) -> Tensor:
        total = None
        for c, op in self._terms:
            part = op._apply(V, out if total is None and c == 1.0 else None)
            if total is None:
                total = part if c == 1.0 else part * c
            else:
                total.add_(part, alpha=c)
                del part
        return total

    def _restricted(self, blocks: Blocks, pieces: list[ParamSlice],
                    label: str) -> CurvatureOperator:
        return type(self)._from_terms(
            [(c, op._restricted(blocks, pieces, label)) for c, op in self._terms], label)

    @classmethod
    def _from_terms(cls, terms: Sequence[tuple[float, CurvatureOperator]],
                    label: str) -> Combination:
        op = cls.__new__(cls)
        Combination.__init__(op, terms, label)
        return op


class Difference(Combination):
    """``A - B``."""

    def __init__(self, a: CurvatureOperator, b: CurvatureOperator,
                 label: str | None = None) -> None:
        super().__init__([(1.0, a), (-1.0, b)], label)
