"""Curvature operators on a model: the Hessian, the Gauss-Newton matrix, the empirical Fisher,
their combinations and per-layer blocks, on one base that owns the data loop.

Where things live: :mod:`~hesslens.curvature.products` (second-order primitives),
:mod:`~hesslens.curvature.loop` (the data loop), :mod:`~hesslens.curvature.base` (the operator
base: a new matrix is a subclass with one per-batch method), one module per matrix
(:mod:`~hesslens.curvature.hessian`, :mod:`~hesslens.curvature.gauss_newton`,
:mod:`~hesslens.curvature.fisher`, :mod:`~hesslens.curvature.combinators`),
:mod:`~hesslens.curvature.paths` (which product path), :mod:`~hesslens.curvature.blocks`,
:mod:`~hesslens.curvature.layers` and :mod:`~hesslens.curvature.layouts` (groupings of
parameters; the transformer preset as a table of layouts a user can extend).
"""

from hesslens.curvature.base import CurvatureOperator
from hesslens.curvature.combinators import Combination, Difference
from hesslens.curvature.fisher import EmpiricalFisher
from hesslens.curvature.gauss_newton import GaussNewton
from hesslens.curvature.hessian import GaussNewtonResidual, Hessian
from hesslens.curvature.layers import discover_layers, select_layers
from hesslens.curvature.layouts import (
    AttentionLayout,
    MLPLayout,
    register_layout,
    unregister_layout,
)
from hesslens.curvature.loop import WeightedBatch

__all__ = [
    "AttentionLayout",
    "Combination",
    "CurvatureOperator",
    "Difference",
    "EmpiricalFisher",
    "GaussNewton",
    "GaussNewtonResidual",
    "Hessian",
    "MLPLayout",
    "WeightedBatch",
    "discover_layers",
    "register_layout",
    "select_layers",
    "unregister_layout",
]
