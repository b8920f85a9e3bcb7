"""hesslens: the curvature of neural-network losses, full network and layer by layer.

Example:
    >>> import torch, hesslens as hl
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
    >>> H = hl.Hessian(model, torch.nn.functional.cross_entropy, data)
    >>> H.eigenvalues(k=3).values.shape
    torch.Size([3])
"""

from hesslens.curvature import (
    CurvatureOperator,
    EmpiricalFisher,
    GaussNewton,
    GaussNewtonResidual,
    Hessian,
    discover_layers,
)
from hesslens.errors import (
    BudgetWarning,
    CheckpointError,
    DataChangedError,
    HesslensError,
    HesslensInputError,
    NonFiniteCurvatureError,
    OutputLockedError,
    PrecisionWarning,
)
from hesslens.linalg import EigenResult, Spectrum, TraceResult
from hesslens.version import __version__

__all__ = [
    "BudgetWarning",
    "CheckpointError",
    "CurvatureOperator",
    "CurvatureTracker",
    "DataChangedError",
    "EigenResult",
    "EmpiricalFisher",
    "GaussNewton",
    "GaussNewtonResidual",
    "Hessian",
    "HessianTracePenalty",
    "HesslensError",
    "HesslensInputError",
    "NegativeCurvatureWarning",
    "NonFiniteCurvatureError",
    "OutputLockedError",
    "PrecisionWarning",
    "SharpnessMonitor",
    "Spectrum",
    "TraceResult",
    "__version__",
    "discover_layers",
]


def __getattr__(name: str):
    # The training layer imports the curvature layer; load it on first use only.
    if name == "HessianTracePenalty":
        from hesslens.training.penalty import HessianTracePenalty

        return HessianTracePenalty
    if name == "NegativeCurvatureWarning":
        from hesslens.training.penalty import NegativeCurvatureWarning

        return NegativeCurvatureWarning
    if name == "CurvatureTracker":
        # the recorder (analysis) with its report (report layer), which draws with matplotlib
        from hesslens.report.tracking import CurvatureTracker

        return CurvatureTracker
    if name == "SharpnessMonitor":
        # the recorder (analysis) with its report (report layer), which draws with matplotlib
        from hesslens.report.sharpness import SharpnessMonitor

        return SharpnessMonitor
    raise AttributeError(f"module 'hesslens' has no attribute {name!r}")
