"""Curvature tracking in the trainer of ``hesslens train``: the trace and top eigenvalue, full and
per layer, after every N epochs (and at initialisation), as keys of the epoch's metrics record.

:class:`EpochTracking` is the trainer's callback. It measures with
:class:`~hesslens.training.tracker.CurvatureTracker` (the same measurement as in any other
training loop) on the fixed analysis subset the trainer gives it
(:func:`hesslens.splits.analysis_subset`; the paper: 10 training examples per class, seed 0)
and writes into the record:

* ``top_eigenvalue``: the largest eigenvalue of the full Hessian (Lanczos);
* ``trace`` / ``trace_stderr``: its trace (Hutch++ to a relative standard error ``trace_rtol``);
  ``trace_converged``: whether it got there (and every layer's) within ``trace_max_hvp``
  products (the budget warning is not shown: the record says it);
* ``layer_trace`` / ``layer_trace_stderr``: ``{layer: tr(H_ll)}`` from the same probes;
* ``layer_top_eigenvalue``: ``{layer: top eigenvalue of H_ll}``;
* optionally (``densities=True``) the eigenvalue densities ``density`` and ``layer_density``
  (``{"nodes": [...], "weights": [...]}``) and ``layer_similarity`` ``{layer: value}`` between
  each layer's spectrum and the full one
  (default :func:`hesslens.analysis.similarity.spectrum_similarity`);
* ``tracking_seconds``: the wall time all of that took.

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

from hesslens.errors import BudgetWarning
from hesslens.training.tracker import CurvatureTracker

__all__ = ["EpochTracking"]

SimilarityFn = Callable[[Any, Any], Any]


class EpochTracking:
    """Measure curvature on ``(inputs, targets)`` at initialisation (epoch 0), every ``every``
    epochs and at ``last_epoch``.

    Args:
        inputs, targets: the fixed analysis subset.
        every: track after epochs ``every, 2 every, ...`` (1-based epoch numbers).
        loss_fn: defaults to mean cross-entropy.
        last_epoch: also track after this epoch (the trainer passes the final one).
        initial: also track at epoch 0, before training.
        per_layer: record per-layer traces and top eigenvalues.
        densities: record densities and each layer's similarity to the full spectrum.
        similarity: ``similarity(full_spectrum, layer_spectrum)`` (a float or a dict of floats).
        seed: seed of every estimator (same probes each time: differences between epochs are
            the model's, not the probes').
        eig_tol: relative tolerance of the eigenvalues.
        trace_rtol: relative standard error the trace estimates stop at.
        trace_max_hvp: ... or the number of products they stop at.
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Tensor,
        every: int = 1,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        last_epoch: int | None = None,
        initial: bool = True,
        per_layer: bool = True,
        densities: bool = False,
        similarity: SimilarityFn | None = None,
        seed: int = 0,
        eig_tol: float = 1e-4,
        trace_rtol: float = 0.02,
        trace_max_hvp: int = 1000,
    ) -> None:
        self.inputs = inputs
        self.targets = targets
        self.every = int(every)
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.last_epoch = last_epoch
        self.initial = initial
        self.per_layer = per_layer
        self.densities = densities
        self.similarity = similarity
        self.seed = seed
        self.eig_tol = eig_tol
        self.trace_rtol = trace_rtol
        self.trace_max_hvp = trace_max_hvp

    def due(self, epoch: int) -> bool:
        """Whether to track after the 1-based ``epoch`` (0: at initialisation)."""
        if self.every <= 0:
            return False
        if epoch == 0:
            return self.initial
        return epoch % self.every == 0 or (self.last_epoch is not None
                                           and epoch == self.last_epoch)

    def __call__(self, epoch: int, record: dict[str, Any], model: nn.Module) -> None:
        """Trainer callback: if due, add the measurements to ``record``."""
        if self.due(epoch):
            record.update(self.measure(model))

    def tracker(self, model: nn.Module) -> CurvatureTracker:
        """The :class:`CurvatureTracker` this callback measures with."""
        similarity: Any = False
        if self.densities:
            if self.similarity is not None:
                similarity = self.similarity
            else:
                from hesslens.analysis.similarity import spectrum_similarity

                similarity = spectrum_similarity
        return CurvatureTracker(
            model, self.loss_fn, (self.inputs, self.targets), layers=self.per_layer, k=1,
            trace=True, density=self.densities, similarity=similarity, seed=self.seed,
            eig_tol=self.eig_tol, trace_rtol=self.trace_rtol, trace_max_hvp=self.trace_max_hvp)

    def measure(self, model: nn.Module) -> dict[str, Any]:
        """All the measurements now, as a flat dict of floats and {layer: float} dicts."""
        with warnings.catch_warnings():
            # A trace short of trace_rtol is recorded as such (trace_converged, trace_stderr);
            # the command line has no budget flag a warning could point to.
            warnings.simplefilter("ignore", BudgetWarning)
            rec = self.tracker(model).measure()
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
        if self.densities:
            out["density"] = full["density"]
            if self.per_layer:
                out["layer_density"] = {k: e["density"] for k, e in layers.items()}
                out["layer_similarity"] = {k: e["similarity"] for k, e in layers.items()}
        out["tracking_seconds"] = rec["seconds"]
        return out
