"""Curvature operators on a model: Hessian, Gauss-Newton and their per-layer blocks."""

from hesslens.curvature.layers import discover_layers, select_layers
from hesslens.curvature.operators import (
    CurvatureOperator,
    GaussNewton,
    GaussNewtonResidual,
    Hessian,
)

__all__ = [
    "CurvatureOperator",
    "GaussNewton",
    "GaussNewtonResidual",
    "Hessian",
    "discover_layers",
    "select_layers",
]
