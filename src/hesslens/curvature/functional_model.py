"""A private, frozen copy of a model for curvature products.

Products must never change the user's model: no BatchNorm running-statistic update, no
parameter or buffer mutation. The operators therefore evaluate a deep copy of the model with
``torch.func.functional_call``, on a snapshot of the parameters taken at construction.

BatchNorm: ``batchnorm="eval"`` (default) uses the running statistics, whatever mode the model is
in; ``batchnorm="batch"`` normalises with each batch's own statistics (train-mode semantics)
without writing them anywhere. Dropout that is active (module in train mode, ``p > 0``) would make
every product random: it is an error unless ``allow_dropout=True``.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    >>> frozen = FunctionalModel(net)
    >>> frozen.module[1].training, net[1].training  # the copy's BatchNorm uses running stats
    (False, True)
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hesslens.errors import HesslensInputError

BatchNormMode = Literal["eval", "batch"]
_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                  nn.FeatureAlphaDropout)


class FunctionalModel:
    """A deep copy of ``model`` in the requested dtype and device, with BatchNorm and dropout set
    up for deterministic products; ``params`` and ``buffers`` are detached snapshots."""

    def __init__(
        self,
        model: nn.Module,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        batchnorm: BatchNormMode = "eval",
        allow_dropout: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise HesslensInputError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        if batchnorm not in ("eval", "batch"):
            raise HesslensInputError(f"batchnorm must be 'eval' or 'batch', not {batchnorm!r}")
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise HesslensInputError(
                "the model has no trainable parameters (all have requires_grad=False): there is "
                "no Hessian to analyse"
            )
        active_dropout = [name for name, m in model.named_modules() if _active_dropout(m)]
        self.random = bool(active_dropout)
        if active_dropout and not allow_dropout:
            raise HesslensInputError(
                f"dropout is active in train mode in {active_dropout}: it makes every Hessian "
                "product random. Call model.eval() first, or pass allow_dropout=True to accept "
                "random products"
            )
        model_device = trainable[0].device
        self.device = torch.device(device) if device is not None else model_device
        self.device_requested = device is not None
        self.dtype = dtype if dtype is not None else trainable[0].dtype
        module = copy.deepcopy(model)
        module.to(device=self.device, dtype=self.dtype)
        for m in module.modules():
            if isinstance(m, _BatchNorm):
                if batchnorm == "eval":
                    m.eval()
                else:
                    # Batch statistics, never written back: with no running buffers, BatchNorm
                    # normalises with the batch's own mean and variance in either mode.
                    m.train()
                    m.track_running_stats = False
                    m.running_mean = None
                    m.running_var = None
                    m.num_batches_tracked = None
        self.module = module
        self.batchnorm = batchnorm
        self.params = {n: p.detach() for n, p in module.named_parameters()}
        self.buffers = {n: b.detach() for n, b in module.named_buffers()}
        self.trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        for p in module.parameters():
            p.requires_grad_(False)

    def __call__(self, params: dict[str, torch.Tensor], args: tuple) -> torch.Tensor:
        """The model's output with ``params`` overriding the snapshot."""
        merged = {**self.params, **params}
        return torch.func.functional_call(self.module, (merged, self.buffers), args)


def _active_dropout(m: nn.Module) -> bool:
    """Dropout modules in train mode with ``p > 0``, and modules with their own dropout rate
    (``nn.MultiheadAttention(dropout=...)``, transformer layers) in train mode."""
    if not m.training:
        return False
    if isinstance(m, _DROPOUT_TYPES):
        return m.p > 0
    rate = getattr(m, "dropout", None)
    return isinstance(rate, float) and rate > 0
