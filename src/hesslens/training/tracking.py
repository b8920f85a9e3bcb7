"""Curvature tracking during training: trace and top eigenvalue, full and per layer, every N epochs.

:class:`CurvatureTracker` is a trainer callback. On a fixed analysis subset (the paper: 10
training examples per class, seed 0) it measures, with :class:`hesslens.Hessian` (BatchNorm in
eval mode, running statistics untouched):

* ``top_eigenvalue``: the largest eigenvalue of the full Hessian (Lanczos);
* ``trace`` / ``trace_stderr``: its trace (Hutch++ to a relative standard error ``trace_rtol``);
* ``layer_trace`` / ``layer_trace_stderr``: ``{layer: tr(H_ll)}`` from the same probes;
* ``layer_top_eigenvalue``: ``{layer: top eigenvalue of H_ll}``;
* optionally (``densities=True``) the eigenvalue densities ``density`` and ``layer_density``
  (``{"nodes": [...], "weights": [...]}``) and, when a similarity function is given or
  registered with :func:`register_similarity`, ``layer_similarity`` ``{layer: value}`` between
  each layer's spectrum and the full one;
* ``tracking_seconds``: the wall time all of that took.

The keys go into the epoch's metrics record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from torch import Tensor, nn

__all__ = ["CurvatureTracker", "register_similarity"]

SimilarityFn = Callable[[Any, Any], Any]
_DEFAULT_SIMILARITY: SimilarityFn | None = None


def register_similarity(fn: SimilarityFn | None) -> None:
    """Set the default ``similarity(full_spectrum, layer_spectrum) -> float`` used when a tracker
    records densities and was given none (the analysis package registers its own)."""
    global _DEFAULT_SIMILARITY
    _DEFAULT_SIMILARITY = fn


def _as_list(x: Any) -> list[float]:
    if isinstance(x, Tensor):
        return [float(v) for v in x.detach().cpu().flatten().tolist()]
    return [float(v) for v in np.asarray(x).ravel().tolist()]


def _spectrum_dict(spec: Any) -> dict[str, list[float]]:
    return {"nodes": _as_list(spec.nodes), "weights": _as_list(spec.weights)}


def _hessian_class() -> Any:
    try:
        from hesslens import Hessian
    except ImportError:
        from hesslens.curvature.operators import Hessian
    return Hessian


def _scalar(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


class CurvatureTracker:
    """Measure curvature on ``(inputs, targets)`` every ``every`` epochs (and at ``last_epoch``).

    Args:
        inputs, targets: the fixed analysis subset.
        every: track after epochs ``every, 2 every, ...`` (1-based epoch numbers).
        loss_fn: defaults to mean cross-entropy.
        last_epoch: also track after this epoch (the trainer passes the final one).
        per_layer: record per-layer traces and top eigenvalues.
        densities: record densities (and similarities, if a similarity function is known).
        similarity: ``similarity(full_spectrum, layer_spectrum)`` (a float or a dict of floats).
        seed: seed of every estimator (same probes each time: differences between epochs are
            the model's, not the probes').
        eig_tol: relative tolerance of the eigenvalues.
        trace_rtol: relative standard error the trace estimates stop at.
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Tensor,
        every: int = 1,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        last_epoch: int | None = None,
        per_layer: bool = True,
        densities: bool = False,
        similarity: SimilarityFn | None = None,
        seed: int = 0,
        eig_tol: float = 1e-4,
        trace_rtol: float = 0.02,
    ) -> None:
        self.inputs = inputs
        self.targets = targets
        self.every = int(every)
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.last_epoch = last_epoch
        self.per_layer = per_layer
        self.densities = densities
        self.similarity = similarity
        self.seed = seed
        self.eig_tol = eig_tol
        self.trace_rtol = trace_rtol

    def due(self, epoch: int) -> bool:
        """Whether to track after the 1-based ``epoch``."""
        if self.every <= 0:
            return False
        return epoch % self.every == 0 or (self.last_epoch is not None
                                           and epoch == self.last_epoch)

    def __call__(self, epoch: int, record: dict[str, Any], model: nn.Module) -> None:
        """Trainer callback: if due, add the measurements to ``record``."""
        if self.due(epoch):
            record.update(self.measure(model))

    def measure(self, model: nn.Module) -> dict[str, Any]:
        """All the measurements now, as a flat dict of floats and {layer: float} dicts."""
        Hessian = _hessian_class()  # lazy: the trainer works without the curvature package

        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            # path="reverse": products chosen by timing could differ in the last bits between
            # an uninterrupted and a resumed run; pinned, the tracked values repeat exactly.
            H = Hessian(model, self.loss_fn, (self.inputs, self.targets), path="reverse")
            out: dict[str, Any] = {}
            top = H.eigenvalues(k=1, tol=self.eig_tol, seed=self.seed, return_vectors=False)
            out["top_eigenvalue"] = _scalar(top.values[0])
            if hasattr(H, "traces"):
                full, layers = H.traces(rtol=self.trace_rtol, seed=self.seed)
            else:  # pragma: no cover - older operator interface
                full = H.trace(seed=self.seed)
                layers = H.layer_traces(seed=self.seed) if self.per_layer else {}
            out["trace"] = _scalar(full.value)
            out["trace_stderr"] = _scalar(full.stderr)
            if self.per_layer:
                out["layer_trace"] = {k: _scalar(r.value) for k, r in layers.items()}
                out["layer_trace_stderr"] = {k: _scalar(r.stderr) for k, r in layers.items()}
                lt = {}
                for name in H.layers:
                    r = H.block(name).eigenvalues(k=1, tol=self.eig_tol, seed=self.seed,
                                                  return_vectors=False)
                    lt[name] = _scalar(r.values[0])
                out["layer_top_eigenvalue"] = lt
            if self.densities:
                full_spec = H.density(seed=self.seed)
                out["density"] = _spectrum_dict(full_spec)
                sim = self.similarity or _DEFAULT_SIMILARITY
                layer_dens, layer_sim = {}, {}
                for name in H.layers:
                    spec = H.block(name).density(seed=self.seed)
                    layer_dens[name] = _spectrum_dict(spec)
                    if sim is not None:
                        s = sim(full_spec, spec)
                        layer_sim[name] = (
                            {k: _scalar(v) for k, v in s.items()} if isinstance(s, dict)
                            else _scalar(s)
                        )
                out["layer_density"] = layer_dens
                if sim is not None:
                    out["layer_similarity"] = layer_sim
        finally:
            model.train(was_training)
        out["tracking_seconds"] = time.perf_counter() - t0
        return out
