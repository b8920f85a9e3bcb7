"""Training towards flatter minima: the Hessian-trace penalty (HTR), SAM, and a trainer that
runs callbacks and resumes exactly.

:func:`train` trains the module it is given on the data it is given (:class:`TensorData` or any
object with the same fields); it knows nothing of the zoo, and measures no curvature itself:
tracking is a callback (:mod:`hesslens.training.callbacks`) from the analysis layer above.
Training a zoo model on a zoo data set by name, with the tracking its configuration asks for, is
:func:`hesslens.experiments.train.train_zoo` (``hesslens train``).

Example:
    >>> import tempfile, torch
    >>> from hesslens.training import TensorData, TrainConfig, train
    >>> x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    >>> y = (x.sum(1) > 0).long()
    >>> data = TensorData(x[:32], y[:32], x[32:], y[32:], num_classes=2)
    >>> cfg = TrainConfig(model="linear", data="toy", epochs=1, batch_size=8, lr=0.1)
    >>> run = train(cfg, tempfile.mkdtemp(), model=torch.nn.Linear(3, 2), dataset=data,
    ...             progress=False)
    >>> run["final"]["epoch"], run["arm"]
    (1, 'SGD')
"""

from hesslens.training.callbacks import TrainingRun
from hesslens.training.config import TrainConfig, arm_key, arm_label
from hesslens.training.layers_select import discover_layers, middle_indices, select_layers
from hesslens.training.penalty import (
    HessianTracePenalty,
    NegativeCurvatureWarning,
    default_fd_eps,
)
from hesslens.training.sam import SAM, bn_stats_frozen
from hesslens.training.trainer import TensorData, evaluate, train

__all__ = [
    "SAM",
    "HessianTracePenalty",
    "NegativeCurvatureWarning",
    "TensorData",
    "TrainConfig",
    "TrainingRun",
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
