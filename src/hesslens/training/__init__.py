"""Training towards flatter minima: the Hessian-trace penalty (HTR), SAM, and a trainer that
tracks curvature and resumes exactly.

Example:
    >>> from hesslens.training import HessianTracePenalty, SAM, TrainConfig, train
    >>> TrainConfig().validate().model
    'cnn1d'
"""

from hesslens.training.config import TrainConfig, arm_key, arm_label
from hesslens.training.layers_select import discover_layers, middle_indices, select_layers
from hesslens.training.penalty import (
    HessianTracePenalty,
    NegativeCurvatureWarning,
    default_fd_eps,
)
from hesslens.training.sam import SAM, bn_stats_frozen
from hesslens.training.tracker import CurvatureTracker
from hesslens.training.tracking import EpochTracking
from hesslens.training.trainer import TensorData, evaluate, train

__all__ = [
    "SAM",
    "CurvatureTracker",
    "EpochTracking",
    "HessianTracePenalty",
    "NegativeCurvatureWarning",
    "TensorData",
    "TrainConfig",
    "arm_key",
    "arm_label",
    "bn_stats_frozen",
    "default_fd_eps",
    "discover_layers",
    "evaluate",
    "middle_indices",
    "select_layers",
    "train",
]
