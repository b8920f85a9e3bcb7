"""The set-up of a training run, before its first step: the checked objects, the seeds, the
data split, the model on its device, the optimizer, the schedule and the penalty.

:func:`set_up` gathers them in a :class:`RunSetup`, which the trainer's other parts (the epoch,
the evaluation, the checkpoint) read; :class:`TensorData` is the data set in memory that
:func:`hesslens.training.train` takes.

Example:
    >>> from hesslens.parallel import current
    >>> from hesslens.training.config import TrainConfig
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(40, 3, generator=g); y = (x[:, 0] > 0).long()
    >>> data = TensorData(x[:32], y[:32], x[32:], y[32:], num_classes=2)
    >>> setup = set_up(TrainConfig(epochs=1, val_fraction=0.25), current(),
    ...                nn.Linear(3, 2), data)
    >>> len(setup.splits.y_train), len(setup.splits.y_val), type(setup.optimizer).__name__
    (24, 8, 'SGD')
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from hesslens.errors import HesslensInputError
from hesslens.parallel import Ranks, resolve_device, torch_group
from hesslens.provenance import dataset_fingerprint, versions
from hesslens.splits import split_train_val
from hesslens.training.config import TrainConfig
from hesslens.training.penalty import HessianTracePenalty
from hesslens.training.sam import SAM

__all__ = ["DATA_FIELDS", "RunSetup", "Splits", "TensorData", "build_optimizer",
           "build_penalty", "build_scheduler", "check_data", "check_objects", "data_parallel",
           "seed_everything", "set_up", "split_data"]

#: What :func:`hesslens.training.train` reads of its ``dataset``.
DATA_FIELDS = ("x_train", "y_train", "x_test", "y_test", "num_classes")


@dataclass
class TensorData:
    """A data set in memory: the fields :func:`hesslens.training.train` reads
    (``hesslens.zoo.Dataset`` has them too).

    >>> data = TensorData(torch.zeros(6, 3), torch.tensor([0, 1] * 3), torch.zeros(2, 3),
    ...                   torch.tensor([0, 1]), num_classes=2)
    >>> data.input_shape
    (3,)
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    name: str = "tensors"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


# ---------------------------------------------------------------------- checks
def check_objects(model: Any, dataset: Any) -> None:
    """Refuse a call without the model or the data, naming the two ways to give them."""
    missing = [name for name, obj in (("model", model), ("dataset", dataset)) if obj is None]
    if missing:
        raise HesslensInputError(
            f"train() needs {' and '.join(f'{m}=' for m in missing)}: pass the module to train "
            "as model= and the data as dataset= (e.g. hesslens.training.TensorData(x_train, "
            "y_train, x_test, y_test, num_classes)), or train a zoo model on a zoo data set by "
            "name with hesslens.experiments.train.train_zoo(config, out_dir)")
    if not isinstance(model, nn.Module):
        raise HesslensInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    absent = [f for f in DATA_FIELDS if not hasattr(dataset, f)]
    if absent:
        raise HesslensInputError(
            f"dataset has no {', '.join(absent)}: give an object with "
            f"{', '.join(DATA_FIELDS)}, e.g. hesslens.training.TensorData")


def check_data(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor,
               num_classes: int, val_fraction: float) -> None:
    """Refuse data that would fail later with an obscure error or train on the wrong thing."""
    for split, x, y in (("training", x_train, y_train), ("test", x_test, y_test)):
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise HesslensInputError(
                f"the {split} inputs and labels must be tensors, got {type(x).__name__} and "
                f"{type(y).__name__}"
            )
        if len(x) != len(y):
            raise HesslensInputError(
                f"the {split} set has {len(x)} inputs but {len(y)} labels"
            )
        if len(y) == 0:
            raise HesslensInputError(f"the {split} set is empty")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise HesslensInputError(
                f"the {split} labels must be integer class indices, got dtype {y.dtype}"
            )
        if y.dim() != 1:
            raise HesslensInputError(
                f"the {split} labels must be one class index per example (shape (n,)), got "
                f"shape {tuple(y.shape)}"
            )
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise HesslensInputError(
                f"the {split} labels range over [{lo}, {hi}], outside the {num_classes} "
                f"classes [0, {num_classes - 1}]"
            )
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise HesslensInputError(f"the {split} inputs contain NaN or infinite values")
    if val_fraction > 0 and math.ceil(val_fraction * len(y_train)) >= len(y_train):
        raise HesslensInputError(
            f"val_fraction {val_fraction} of {len(y_train)} training examples leaves none to "
            "train on; lower it"
        )


# ---------------------------------------------------------------------- building blocks
def seed_everything(seed: int) -> None:
    """Seed torch, numpy and ``random`` for a fresh run (a resumed run restores its states)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum (and coupled weight decay); wrapped in SAM when ``sam_rho > 0``."""
    kwargs = dict(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.sam_rho > 0:
        return SAM(params, torch.optim.SGD, rho=config.sam_rho, **kwargs)
    return torch.optim.SGD(params, **kwargs)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-epoch learning-rate schedule (stepped once after every epoch)."""
    base = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
    if config.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(
            base, milestones=config.milestones_or_default(), gamma=config.lr_gamma
        )
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=config.epochs)
    return torch.optim.lr_scheduler.LambdaLR(base, lr_lambda=_constant)


def _constant(epoch: int) -> float:
    return 1.0


def build_penalty(model: nn.Module, config: TrainConfig,
                  loss_fn: Callable[..., Tensor]) -> HessianTracePenalty | None:
    """The Hessian-trace penalty the config asks for (``htr_gamma > 0``), or ``None``."""
    if config.htr_gamma <= 0:
        return None
    return HessianTracePenalty(
        model, layers=config.htr_layers, n_probes=config.htr_probes,
        distribution=config.htr_distribution, method=config.htr_method,
        fd_eps=config.htr_fd_eps, seed=config.seed, loss_fn=loss_fn,
        curvature=config.htr_curvature,
    )


def data_parallel(model: nn.Module, device: torch.device,
                  ranks: Ranks) -> nn.Module | None:
    """``DistributedDataParallel(model)`` under torch.distributed (it broadcasts rank 0's
    parameters and buffers), else ``None``."""
    if not ranks.distributed:
        return None
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        process_group=torch_group(ranks.group))


# ---------------------------------------------------------------------- the data
@dataclass
class Splits:
    """The run's data on its device: training (validation held out), validation and test."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


def split_data(dataset: Any, config: TrainConfig, device: torch.device) -> Splits:
    """``config.val_fraction`` of the training part held out, stratified
    (:func:`hesslens.splits.split_train_val`; none at 0), and everything moved to ``device``."""
    x, y = dataset.x_train, dataset.y_train
    if config.val_fraction > 0:
        x, y, x_val, y_val = split_train_val(x, y, val_fraction=config.val_fraction,
                                             seed=config.seed)
    else:
        x_val, y_val = x[:0], y[:0]
    return Splits(x.to(device), y.to(device), x_val.to(device), y_val.to(device),
                  dataset.x_test.to(device), dataset.y_test.to(device))


# ---------------------------------------------------------------------- the run
@dataclass
class RunSetup:
    """Everything a run trains with, built once by :func:`set_up`."""

    config: TrainConfig
    ranks: Ranks
    device: torch.device
    dataset: Any
    splits: Splits
    model: nn.Module
    ddp: nn.Module | None
    loss_fn: Callable[..., Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    penalty: HessianTracePenalty | None
    provenance: dict[str, Any]


def set_up(config: TrainConfig, ranks: Ranks, model: nn.Module, dataset: Any) -> RunSetup:
    """Seeds, checked data and its split, the model on the run's device (wrapped in DDP under
    torch.distributed), the optimizer, its schedule and the penalty, in this order (the
    order in which they draw random numbers is part of a run's bit-for-bit repeatability)."""
    device = resolve_device(config.device, ranks)
    seed_everything(config.seed)
    check_data(dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test,
               int(dataset.num_classes), config.val_fraction)
    splits = split_data(dataset, config, device)
    if isinstance(model, DistributedDataParallel):
        model = model.module  # wrapped here again, with the trainer's own gradient sums
    model.to(device)
    if not any(p.requires_grad for p in model.parameters()):
        raise HesslensInputError(
            "the model has no trainable parameters (all have requires_grad=False); there is "
            "nothing to train"
        )
    loss_fn = nn.functional.cross_entropy
    provenance = {"data": dataset_fingerprint(dataset, getattr(dataset, "name", config.data)),
                  "versions": versions(device), "parallel": ranks.record()}
    ddp = data_parallel(model, device, ranks)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    penalty = build_penalty(model, config, loss_fn)
    return RunSetup(config=config, ranks=ranks, device=device, dataset=dataset, splits=splits,
                    model=model, ddp=ddp, loss_fn=loss_fn, optimizer=optimizer,
                    scheduler=scheduler, penalty=penalty, provenance=provenance)
