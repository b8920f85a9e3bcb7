"""Curvature tracking in the trainer of ``hesslens train``: the trace and top eigenvalue, full and
per layer, after every N epochs (and at initialisation), as keys of the epoch's metrics record.

:class:`EpochTracking` is a trainer callback (:mod:`hesslens.training.callbacks`). It measures
with :class:`~hesslens.analysis.tracker.CurvatureRecorder` (the same measurement as in any other
training loop) on the fixed analysis subset the trainer's ``start(run)`` gives it
(:attr:`hesslens.training.callbacks.TrainingRun.analysis_data`; the paper: 10 training examples
per class, seed 0) and writes into the record:

* ``top_eigenvalue``: the largest eigenvalue of the full Hessian (Lanczos);
* ``trace`` / ``trace_stderr``: its trace (Hutch++ to a relative standard error ``trace_rtol``);
  ``trace_converged``: whether it got there (and every layer's) within ``trace_max_hvp``
  products (the budget warning is not shown: the record says it);
* ``layer_trace`` / ``layer_trace_stderr``: ``{layer: tr(H_ll)}`` from the same probes;
* ``layer_top_eigenvalue``: ``{layer: top eigenvalue of H_ll}``;
* optionally (``densities``) the eigenvalue densities ``density`` and ``layer_density``
  (``{"nodes": [...], "weights": [...]}``) and ``layer_similarity`` ``{layer: value}`` between
  each layer's spectrum and the full one
  (default :func:`hesslens.analysis.similarity.spectrum_similarity`);
* ``tracking_seconds``: the wall time all of that took.

Settings left ``None`` come from the run at ``start(run)``: ``every`` from
``config.track_every``, ``last_epoch`` from ``config.epochs``, ``densities`` from
``config.track_densities``, the loss from the trainer's, the data from its analysis subset. So
``train(config, ..., callbacks=[EpochTracking()])`` tracks as ``config`` says.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> cb = EpochTracking(x, y, every=2, last_epoch=3)
    >>> [e for e in range(4) if cb.due(e)]
    [0, 2, 3]
    >>> sorted(cb.measure(model))[:4]
    ['layer_top_eigenvalue', 'layer_trace', 'layer_trace_stderr', 'top_eigenvalue']
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from hesslens.analysis.similarity import spectrum_similarity
from hesslens.analysis.tracker import CurvatureRecorder
from hesslens.checks import check_int
from hesslens.errors import BudgetWarning, HesslensInputError

__all__ = ["EpochTracking"]

SimilarityFn = Callable[[Any, Any], Any]


class EpochTracking:
    """Measure curvature at initialisation (epoch 0), every ``every`` epochs and at
    ``last_epoch``, on the run's analysis data (or on ``(inputs, targets)``).

    Args:
        inputs, targets: the fixed data to measure on; ``None``: the run's analysis subset
            (each rank's shard under torchrun), given by ``start(run)``.
        every: track after epochs ``every, 2 every, ...`` (1-based epoch numbers); 0: never;
            ``None``: the run's ``config.track_every`` (1 outside a trainer).
        loss_fn: ``None``: the trainer's loss (mean cross-entropy outside a trainer).
        last_epoch: also track after this epoch; ``None``: the run's last one.
        initial: also track at epoch 0, before training.
        per_layer: record per-layer traces and top eigenvalues.
        densities: record densities and each layer's similarity to the full spectrum;
            ``None``: the run's ``config.track_densities`` (off outside a trainer).
        similarity: ``similarity(full_spectrum, layer_spectrum)`` (a float or a dict of floats).
        seed: seed of every estimator (same probes each time: differences between epochs are
            the model's, not the probes').
        eig_tol: relative tolerance of the eigenvalues.
        trace_rtol: relative standard error the trace estimates stop at.
        trace_max_hvp: ... or the number of products they stop at.
    """

    #: It does the tracking that ``config.track_every > 0`` asks the trainer for.
    tracks_curvature = True

    def __init__(
        self,
        inputs: Tensor | None = None,
        targets: Tensor | None = None,
        every: int | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        last_epoch: int | None = None,
        initial: bool = True,
        per_layer: bool = True,
        densities: bool | None = None,
        similarity: SimilarityFn | None = None,
        seed: int = 0,
        eig_tol: float = 1e-4,
        trace_rtol: float = 0.02,
        trace_max_hvp: int = 1000,
    ) -> None:
        if (inputs is None) != (targets is None):
            raise HesslensInputError(
                "give both inputs and targets (the data to measure on), or neither (the "
                "run's analysis subset)")
        self.inputs = inputs
        self.targets = targets
        self.every = None if every is None else check_int(every, "every")
        self.loss_fn = loss_fn
        self.last_epoch = last_epoch
        self.at_start = bool(initial)
        self.per_layer = per_layer
        self.densities = densities
        self.similarity = similarity
        self.seed = seed
        self.eig_tol = eig_tol
        self.trace_rtol = trace_rtol
        self.trace_max_hvp = trace_max_hvp
        self.run: Any = None  # the trainer's TrainingRun, from start(run)

    # ------------------------------------------------------------------ the run's settings
    def start(self, run: Any) -> None:
        """Follow ``run``, a :class:`hesslens.training.callbacks.TrainingRun` (called by the
        trainer before the first step): its settings fill in those left ``None``; its analysis
        subset is drawn now (a subset too small for the processes is refused before
        training)."""
        self.run = run
        if self.inputs is None:
            run.analysis_data  # noqa: B018 -- drawn and checked now, before the first step

    def _every(self) -> int:
        if self.every is not None:
            return self.every
        return self.run.config.track_every if self.run is not None else 1

    def _last_epoch(self) -> int | None:
        if self.last_epoch is not None or self.run is None:
            return self.last_epoch
        return self.run.config.epochs

    def _densities(self) -> bool:
        if self.densities is not None:
            return bool(self.densities)
        return bool(self.run is not None and self.run.config.track_densities)

    def _data(self) -> tuple[Tensor, Tensor]:
        if self.inputs is not None:
            return self.inputs, self.targets
        if self.run is None:
            raise HesslensInputError(
                "EpochTracking measures on the run's analysis data, which it gets from the "
                "trainer's start(run); pass inputs and targets to measure outside a trainer")
        return self.run.analysis_data

    def _loss_fn(self) -> Callable[..., Tensor]:
        if self.loss_fn is not None:
            return self.loss_fn
        return self.run.loss_fn if self.run is not None else nn.functional.cross_entropy

    # ------------------------------------------------------------------ the callback
    @property
    def initial(self) -> bool:
        """Whether the trainer calls this callback at epoch 0 too."""
        return self.due(0)

    def due(self, epoch: int) -> bool:
        """Whether to track after the 1-based ``epoch`` (0: at initialisation)."""
        every = self._every()
        if every <= 0:
            return False
        if epoch == 0:
            return self.at_start
        last = self._last_epoch()
        return epoch % every == 0 or (last is not None and epoch == last)

    def __call__(self, epoch: int, record: dict[str, Any], model: nn.Module) -> None:
        """Trainer callback: if due, add the measurements to ``record``."""
        if self.due(epoch):
            record.update(self.measure(model))

    def recorder(self, model: nn.Module) -> CurvatureRecorder:
        """The :class:`CurvatureRecorder` this callback measures with."""
        densities = self._densities()
        similarity: Any = False
        if densities:
            similarity = self.similarity if self.similarity is not None else spectrum_similarity
        return CurvatureRecorder(
            model, self._loss_fn(), self._data(), layers=self.per_layer, k=1, trace=True,
            density=densities, similarity=similarity, seed=self.seed, eig_tol=self.eig_tol,
            trace_rtol=self.trace_rtol, trace_max_hvp=self.trace_max_hvp)

    def measure(self, model: nn.Module) -> dict[str, Any]:
        """All the measurements now, as a flat dict of floats and {layer: float} dicts."""
        with warnings.catch_warnings():
            # A trace short of trace_rtol is recorded as such (trace_converged, trace_stderr);
            # the command line has no budget flag a warning could point to.
            warnings.simplefilter("ignore", BudgetWarning)
            rec = self.recorder(model).measure()
        full, layers = rec["full"], rec["layers"]
        out: dict[str, Any] = {
            "top_eigenvalue": full["top_eigenvalues"][0],
            "trace": full["trace"],
            "trace_stderr": full["trace_stderr"],
            "trace_converged": full["trace_converged"],
        }
        if self.per_layer:
            out["layer_trace"] = {k: e["trace"] for k, e in layers.items()}
            out["layer_trace_stderr"] = {k: e["trace_stderr"] for k, e in layers.items()}
            out["layer_top_eigenvalue"] = {k: e["top_eigenvalues"][0] for k, e in layers.items()}
        if self._densities():
            out["density"] = full["density"]
            if self.per_layer:
                out["layer_density"] = {k: e["density"] for k, e in layers.items()}
                out["layer_similarity"] = {k: e["similarity"] for k, e in layers.items()}
        out["tracking_seconds"] = rec["seconds"]
        return out
