"""Curvature operators on a model: the Hessian, the Gauss-Newton matrix, the empirical Fisher,
their combinations and per-layer blocks, on one base that owns the data loop.

Where things live: :mod:`~hesslens.curvature.products` (second-order primitives),
:mod:`~hesslens.curvature.loop` (the data loop), :mod:`~hesslens.curvature.base` (the operator
base: a new matrix is a subclass with one per-batch method), one module per matrix
(:mod:`~hesslens.curvature.hessian`, :mod:`~hesslens.curvature.gauss_newton`,
:mod:`~hesslens.curvature.fisher`, :mod:`~hesslens.curvature.combinators`),
:mod:`~hesslens.curvature.paths` (which product path), :mod:`~hesslens.curvature.blocks` and
:mod:`~hesslens.curvature.layers` (groupings of parameters).
"""

from hesslens.curvature.base import CurvatureOperator
from hesslens.curvature.combinators import Combination, Difference
from hesslens.curvature.fisher import EmpiricalFisher
from hesslens.curvature.gauss_newton import GaussNewton
from hesslens.curvature.hessian import GaussNewtonResidual, Hessian
from hesslens.curvature.layers import discover_layers, select_layers
from hesslens.curvature.loop import WeightedBatch

__all__ = [
    "Combination",
    "CurvatureOperator",
    "Difference",
    "EmpiricalFisher",
    "GaussNewton",
    "GaussNewtonResidual",
    "Hessian",
    "WeightedBatch",
    "discover_layers",
    "select_layers",
]
