"""Curvature in any training loop: :class:`CurvatureRecorder` records, at the model's current
weights, the top eigenvalues and traces of the full Hessian and of every layer's block on a
fixed analysis set, as often as asked.

The measurement is the layer study's (:func:`hesslens.analysis.spectra.measure_curvature`), on a
fresh :class:`hesslens.Hessian` of the model as it is now. Recording never changes training: the
operator works on a private copy of the model, and the global random states (torch CPU and
CUDA, numpy, ``random``) and the model's train/eval mode are put back as they were
(:func:`untouched_state`), so a loop with the recorder ends bit-identical to the same loop
without it (``tests/analysis/test_tracker.py`` checks exactly that).

``hl.CurvatureTracker`` (:class:`hesslens.report.tracking.CurvatureTracker`) is this recorder
with ``write_report``; the analysis layer holds no figure code.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> recorder = CurvatureRecorder(model, nn.functional.cross_entropy, (x, y), every=2)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> for step in range(4):
    ...     opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward(); opt.step()
    ...     _ = recorder.update(step)
    >>> [r["step"] for r in recorder.history], sorted(recorder.history[-1]["layers"])
    ([0, 2], ['0', '2'])
    >>> sorted(recorder.history[-1]["full"])
    ['dim', 'top_eigenvalues', 'trace', 'trace_converged', 'trace_stderr']
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hesslens.analysis.history import HistoryFiles, HistoryRecorder
from hesslens.analysis.similarity import compare_spectra
from hesslens.analysis.spectra import measure_curvature
from hesslens.checks import check_positive_int, check_seed
from hesslens.curvature import Hessian
from hesslens.errors import HesslensInputError

__all__ = ["FILES", "HISTORY_CSV", "HISTORY_JSON", "SCHEMA", "CurvatureRecorder", "flat_record",
           "untouched_state"]

#: Identifier of the layout of ``curvature.json``.
SCHEMA = "hesslens.curvature_history/1"
HISTORY_JSON = "curvature.json"
HISTORY_CSV = "curvature.csv"

SimilarityFn = Callable[[Any, Any], Any]


@contextlib.contextmanager
def untouched_state(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Run the block with ``model`` in eval mode (when ``eval_mode``) and put back, afterwards,
    every module's train/eval flag and the global random states of torch (CPU and every
    initialised CUDA device), numpy and ``random``."""
    modes = [(m, m.training) for m in model.modules()]
    py_state = random.getstate()
    np_state = np.random.get_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        try:
            if eval_mode:
                model.eval()
            yield
        finally:
            for m, mode in modes:
                m.training = mode
            random.setstate(py_state)
            np.random.set_state(np_state)


def _floats(x: Any) -> list[float]:
    if isinstance(x, torch.Tensor):
        return [float(v) for v in x.detach().cpu().flatten().tolist()]
    return [float(v) for v in np.asarray(x, dtype=float).ravel().tolist()]


def _entry(est: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"dim": int(est.dim), "top_eigenvalues": _floats(est.top.values)}
    if est.trace is not None:
        out["trace"] = float(est.trace.value)
        out["trace_stderr"] = float(est.trace.stderr)
        out["trace_converged"] = bool(getattr(est.trace, "converged", True))
    if est.density is not None:
        out["density"] = {"nodes": _floats(est.density.nodes),
                          "weights": _floats(est.density.weights)}
    return out


def _similarity_numbers(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): float(v) for k, v in value.items()
                if (isinstance(v, (int, float, np.floating)) and not isinstance(v, bool))
                or (isinstance(v, torch.Tensor) and v.numel() == 1)}
    return float(value)


def _default_similarity(full: Any, layer: Any) -> dict[str, float]:
    return compare_spectra(layer, full)


def flat_record(rec: Mapping[str, Any]) -> dict[str, Any]:
    """One CSV row of a record: ``step``, ``seconds``, ``full.top_eigenvalue``,
    ``full.trace``, ``full.trace_stderr``, ``layers.<name>.<same>`` and
    ``layers.<name>.similarity[.<metric>]`` (densities stay in the JSON)."""
    row: dict[str, Any] = {"step": rec["step"], "seconds": rec.get("seconds"),
                           "n_hvp": rec.get("n_hvp")}

    def add(prefix: str, entry: Mapping[str, Any]) -> None:
        tops = entry.get("top_eigenvalues") or []
        row[f"{prefix}.top_eigenvalue"] = tops[0] if tops else None
        if len(tops) > 1:
            row[f"{prefix}.top_eigenvalues"] = tops
        for key in ("trace", "trace_stderr"):
            if key in entry:
                row[f"{prefix}.{key}"] = entry[key]
        sim = entry.get("similarity")
        if isinstance(sim, Mapping):
            for k, v in sim.items():
                row[f"{prefix}.similarity.{k}"] = v
        elif sim is not None:
            row[f"{prefix}.similarity"] = sim

    add("full", rec["full"])
    for name, entry in rec.get("layers", {}).items():
        add(f"layers.{name}", entry)
    return row


#: The tracker's files: ``curvature.json`` and ``curvature.csv``.
FILES = HistoryFiles(HISTORY_JSON, HISTORY_CSV, SCHEMA, "curvature", flat_record)


class CurvatureRecorder(HistoryRecorder):
    """Record curvature during training: call :meth:`update` in the loop.

    Args:
        model: the network being trained (read, never changed).
        loss_fn: ``loss_fn(outputs, targets)`` -> mean loss of a batch, passed to
            :class:`hesslens.Hessian` as it is (so anything it accepts works here, e.g.
            ``None`` for a model that computes its own loss, where the operator supports it).
        data: the fixed analysis data: ``(inputs, targets)`` or an iterable of batches,
            passed to :class:`hesslens.Hessian` as it is. Keep it fixed (no shuffling, no
            augmentation): the records then differ only by the weights.
        out: a folder; each record is appended to ``out/curvature.json`` and
            ``out/curvature.csv`` (both rewritten atomically) as it is made. A tracker on a
            folder that already holds a history continues it; a record whose step is not
            after the last one replaces the records from that step on (a run resumed from a
            checkpoint measures those steps again). The tracker holds the folder's lock
            (:mod:`hesslens.locks`) from construction until :meth:`close` (or the end of a
            ``with`` block, or of the process): a second writer there, another tracker
            included, gets :class:`~hesslens.errors.OutputLockedError` instead of the two
            overwriting each other's records.
        every: record on calls ``1, every + 1, 2 every + 1, ...`` of :meth:`update`.
        layers: ``True`` (every layer block, the operator's default grouping), ``False``
            (full network only), a list of layer names, or a grouping for
            :class:`hesslens.Hessian`'s ``layers=`` (a mapping, or a preset name where the
            operator has presets), every group of which is measured.
        k: top eigenvalues per entry.
        trace: also record traces (all layers from the full network's probes).
        density: also record SLQ eigenvalue densities (deflated with the top-``k`` pairs).
        similarity: also record each layer's similarity to the full spectrum (needs the
            densities, which are then measured): ``True`` for
            :func:`hesslens.analysis.similarity.compare_spectra`'s numbers, or your own
            ``similarity(full_spectrum, layer_spectrum) -> float or {name: float}``.
        seed: seed of every estimator, in ``[0, 2**32)`` (:func:`hesslens.checks.check_seed`):
            the same start vectors and probes at every record, so that differences between
            records are the model's, not the probes'.
        eig_tol: relative a-posteriori tolerance of the eigenvalues.
        trace_rtol, trace_max_hvp: the traces stop at this relative standard error, or after
            this many products. These defaults are :class:`hesslens.Hessian`'s, so a record
            repeats what ``H.eigenvalues()``, ``H.trace()`` and ``H.traces()`` give on the same
            weights.
        density_probes, density_steps: SLQ probes and Lanczos steps per probe.
        eval_mode: measure with the model in eval mode (dropout off, BatchNorm on its running
            statistics); the mode is restored afterwards.
        hessian_options: more keyword arguments for :class:`hesslens.Hessian` (``path``
            defaults to ``"reverse"``, pinned so that reruns repeat bit for bit).

    Attributes:
        history: the records, oldest first: ``{"step", "full": {"top_eigenvalues": [...],
            "trace", "trace_stderr", "trace_converged", "dim"[, "density"]}, "layers": {name:
            {... the same [, "similarity"]}}, "seconds", "n_hvp"}`` (``trace_converged``:
            whether the trace reached ``trace_rtol`` within ``trace_max_hvp`` products).
    """

    files = FILES
    measured_keys = frozenset({"full", "layers", "seconds", "n_hvp"})

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        out: str | Path | None = None,
        every: int = 1,
        layers: bool | Sequence[str] | Mapping[str, Any] | str = True,
        k: int = 1,
        trace: bool = True,
        density: bool = False,
        similarity: bool | SimilarityFn = False,
        seed: int = 0,
        *,
        eig_tol: float = 1e-6,
        trace_rtol: float = 0.01,
        trace_max_hvp: int = 1000,
        density_probes: int = 2,
        density_steps: int = 80,
        eval_mode: bool = True,
        hessian_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise HesslensInputError(
                f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.k = check_positive_int(k, "k")
        self.trace = bool(trace)
        self.similarity: SimilarityFn | None = (
            similarity if callable(similarity) else _default_similarity if similarity else None)
        self.density = bool(density) or self.similarity is not None
        self.seed = check_seed(seed)
        if not (isinstance(eig_tol, (int, float)) and eig_tol > 0):
            raise HesslensInputError(f"eig_tol must be positive, got {eig_tol!r}")
        if not (isinstance(trace_rtol, (int, float)) and trace_rtol > 0):
            raise HesslensInputError(f"trace_rtol must be positive, got {trace_rtol!r}")
        self.eig_tol = float(eig_tol)
        self.trace_rtol = float(trace_rtol)
        self.trace_max_hvp = check_positive_int(trace_max_hvp, "trace_max_hvp")
        self.density_probes = check_positive_int(density_probes, "density_probes")
        self.density_steps = check_positive_int(density_steps, "density_steps")
        self.eval_mode = bool(eval_mode)
        self.hessian_options = {"path": "reverse", **dict(hessian_options or {})}
        if "layers" in self.hessian_options:
            raise HesslensInputError("pass the grouping as layers=, not in hessian_options")
        self._grouping: Any = None
        self._names: bool | list[str] = bool(layers)
        if isinstance(layers, (Mapping, str)):
            self._grouping, self._names = layers, True
        elif not isinstance(layers, bool):
            if not isinstance(layers, Sequence) or not all(isinstance(n, str) for n in layers):
                raise HesslensInputError(
                    "layers must be True, False, a list of layer names or a grouping "
                    f"(mapping), got {type(layers).__name__}")
            self._names = list(layers)
        super().__init__(out, every)

    # ------------------------------------------------------------------ recording
    def settings(self) -> dict[str, Any]:
        """What each record measured, as stored in ``curvature.json``."""
        return {
            "every": self.every, "k": self.k, "trace": self.trace, "density": self.density,
            "similarity": self.similarity is not None, "seed": self.seed,
            "eig_tol": self.eig_tol, "trace_rtol": self.trace_rtol,
            "trace_max_hvp": self.trace_max_hvp, "density_probes": self.density_probes,
            "density_steps": self.density_steps, "eval_mode": self.eval_mode,
            "layers": (self._names if isinstance(self._names, list) else
                       "all" if self._names else "none"),
            "grouping": (self._grouping if isinstance(self._grouping, (str, type(None)))
                         else {str(k): [str(p) for p in ([v] if isinstance(v, str) else v)]
                               for k, v in self._grouping.items()}),
            "hessian_options": {k: str(v) for k, v in self.hessian_options.items()},
        }

    def measure(self) -> dict[str, Any]:
        """The measurement at the model's current weights, without filing it: ``{"full",
        "layers", "seconds", "n_hvp"}``."""
        t0 = time.perf_counter()
        with untouched_state(self.model, self.eval_mode):
            H = Hessian(self.model, self.loss_fn, self.data, layers=self._grouping,
                        **self.hessian_options)
            m = measure_curvature(
                H, layers=self._names, k=self.k, tol=self.eig_tol, trace=self.trace,
                trace_rtol=self.trace_rtol, trace_max_hvp=self.trace_max_hvp,
                density=self.density, n_probes=self.density_probes,
                n_steps=self.density_steps, seed=self.seed)
            layers = {name: _entry(est) for name, est in m.layers.items()}
            if self.similarity is not None:
                for name, est in m.layers.items():
                    layers[name]["similarity"] = _similarity_numbers(
                        self.similarity(m.full.density, est.density))
        return {"full": _entry(m.full), "layers": layers,
                "seconds": time.perf_counter() - t0, "n_hvp": int(m.n_hvp)}
