"""The layer study: the Hessian spectrum of the full network and of every layer's block, side
by side (Sankar et al., AAAI 2021, and beyond).

For the full Hessian and for each layer's diagonal block, :func:`layer_study` measures

* the top-``k`` eigenvalues (Lanczos, tight a-posteriori tolerance, so that Cauchy interlacing
  ``lambda_i(block) <= lambda_i(full)`` can be checked on the numbers);
* the trace -- all layer traces from the same probes as the full one, so they add up to it;
* the eigenvalue density (stochastic Lanczos quadrature, deflated with the top eigenpairs just
  computed: nothing is computed twice);
* the Gauss-Newton split (top eigenvalues, trace and density of ``G`` and of ``Hess - G``);
* for layers: normalised depth, parameter count, the ratios of its top eigenvalue and trace
  to the full ones, and the similarity of its spectrum to the full one
  (:mod:`hesslens.analysis.similarity`).

Everything is reproducible from ``seed``.

Example:
    >>> import torch
    >>> from hesslens.analysis import layer_study
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
    >>> study = layer_study(model, torch.nn.functional.cross_entropy, data, k=2,
    ...                     density_probes=2, density_steps=20, progress=False)
    >>> list(study.layers), study.layers["2"].depth
    (['0', '2'], 1.0)
    >>> sorted(study.to_dict()["full"])[:4]
    ['density', 'dim', 'eigensolver', 'gauss_newton']
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hesslens.analysis.gauss_newton import GaussNewtonSplit, gauss_newton_split
from hesslens.analysis.similarity import (
    DEFAULT_NORMALIZE,
    NORMALIZATIONS,
    compare_spectra,
    depths,
    summarize_similarity,
)
from hesslens.analysis.spectra import SpectrumEstimate, measure_curvature
from hesslens.checks import check_int, check_positive_int, check_positive_number
from hesslens.curvature import Hessian
from hesslens.errors import HesslensInputError
from hesslens.linalg import Spectrum

__all__ = ["SCHEMA", "LayerEntry", "LayerStudy", "StudyEntry", "interlacing", "layer_study"]

#: Identifier of the layout :meth:`LayerStudy.to_dict` produces.
SCHEMA = "hesslens.layer_study/1"


def interlacing(block: SpectrumEstimate, full: SpectrumEstimate) -> dict[str, Any]:
    """Check Cauchy interlacing on the computed numbers: the i-th largest eigenvalue of a
    diagonal block is at most the i-th largest of the whole matrix.

    ``violation_i = lambda_i(block) - lambda_i(full)``; the check allows each violation up to
    the sum of the two values' a-posteriori error bounds (``tolerance_i``).

    Returns:
        ``{"holds", "max_violation", "violations", "tolerances"}``.
    """
    b = block.top_eigenvalues
    f = full.top_eigenvalues
    n = min(len(b), len(f))

    def bounds(est: SpectrumEstimate) -> list[float]:
        if est.top.bounds is not None:
            return [float(x) for x in est.top.bounds]
        return [float(x) for x in est.top.residuals]

    bb, fb = bounds(block), bounds(full)
    violations = [b[i] - f[i] for i in range(n)]
    tolerances = [bb[i] + fb[i] for i in range(n)]
    return {
        "holds": all(v <= t for v, t in zip(violations, tolerances)),
        "max_violation": max(violations) if violations else 0.0,
        "violations": violations,
        "tolerances": tolerances,
    }


@dataclass(eq=False)
class StudyEntry:
    """The full network's measurements (and the base of :class:`LayerEntry`).

    Attributes:
        name: ``"full"`` or the layer's name.
        hessian: top eigenvalues, trace and density of the Hessian (block).
        gauss_newton: the Gauss-Newton split, or ``None`` when not measured.
        similarity: for the full entry the layer ranking (see
            :func:`~hesslens.analysis.similarity.summarize_similarity`); for a layer its
            distances to the full spectrum.
    """

    name: str
    hessian: SpectrumEstimate
    gauss_newton: GaussNewtonSplit | None = None
    similarity: dict[str, Any] | None = None

    @property
    def top_eigenvalues(self) -> list[float]:
        return self.hessian.top_eigenvalues

    @property
    def top_eigenvalue(self) -> float:
        return self.hessian.top_eigenvalues[0]

    @property
    def trace(self) -> float | None:
        return None if self.hessian.trace is None else float(self.hessian.trace.value)

    @property
    def density(self) -> Spectrum:
        return self.hessian.density

    @property
    def n_params(self) -> int:
        return self.hessian.dim

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "n_params": self.n_params}
        out.update(self.hessian.to_dict())
        out["similarity"] = self.similarity
        out["gauss_newton"] = None if self.gauss_newton is None else self.gauss_newton.to_dict()
        return out


@dataclass(eq=False)
class LayerEntry(StudyEntry):
    """One layer's block, with its place in the network and its relation to the full one."""

    index: int = 0
    depth: float = 0.0
    parameters: list[str] = field(default_factory=list)
    top_ratio: float | None = None
    trace_ratio: float | None = None
    interlacing: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update({
            "index": self.index,
            "depth": self.depth,
            "parameters": list(self.parameters),
            "ratios": {"top_eigenvalue": self.top_ratio, "trace": self.trace_ratio},
            "interlacing": self.interlacing,
        })
        return out


@dataclass(eq=False)
class LayerStudy:
    """The result of :func:`layer_study`.

    Attributes:
        full: the full network's entry.
        layers: ``{layer name: LayerEntry}`` in forward order.
        settings: the estimator settings and seed.
        loss, grad_norm: the mean loss and its gradient norm at the analysed point.
        num_samples: how many samples the loss averages over.
        timings: seconds per step.
        n_hvp: operator products used in all (a residual product counts once, though it
            costs a Hessian and a Gauss-Newton product).
    """

    full: StudyEntry
    layers: dict[str, LayerEntry]
    settings: dict[str, Any]
    loss: float
    grad_norm: float
    num_samples: int
    timings: dict[str, float] = field(default_factory=dict)
    n_hvp: int = 0

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    @property
    def similarity(self) -> dict[str, Any]:
        """The layer ranking by similarity to the full spectrum."""
        return self.full.similarity or {}

    def checks(self) -> dict[str, Any]:
        """Self-consistency of the numbers: interlacing of every block, layer traces adding up
        to the full trace, densities being probability measures."""
        layer_sum = sum(e.trace or 0.0 for e in self.layers.values())
        full_trace = self.full.trace or 0.0
        entries = [self.full, *self.layers.values()]
        return {
            "interlacing_holds": all(bool(e.interlacing and e.interlacing["holds"])
                                     for e in self.layers.values()),
            "max_interlacing_violation": max(
                (e.interlacing["max_violation"] for e in self.layers.values() if e.interlacing),
                default=0.0),
            "layer_trace_sum": layer_sum,
            "full_trace": full_trace,
            "trace_sum_error": abs(layer_sum - full_trace),
            "densities_normalized": all(
                abs(float(e.density.weights.sum()) - 1.0) < 1e-9
                and bool((e.density.weights >= 0).all()) for e in entries),
        }

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout (see ``docs`` of :mod:`hesslens.experiments.analyze`): top-level
        ``full`` and ``layers`` (``{name: entry}``, forward order) plus the settings, the seed,
        the analysed point, the similarity ranking and self-checks."""
        return {
            "schema": SCHEMA,
            "seed": self.settings.get("seed"),
            "settings": dict(self.settings),
            "num_samples": self.num_samples,
            "point": {"loss": self.loss, "grad_norm": self.grad_norm},
            "layer_names": self.layer_names,
            "full": self.full.to_dict(),
            "layers": {name: entry.to_dict() for name, entry in self.layers.items()},
            "similarity": self.similarity,
            "checks": self.checks(),
            "timings": dict(self.timings),
            "n_hvp": self.n_hvp,
        }


class _Steps:
    """Progress (tqdm) over the study's steps, and their timings."""

    def __init__(self, total: int, progress: bool | Callable[[str], None]) -> None:
        self.timings: dict[str, float] = {}
        self.callback = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            self.bar = tqdm(total=total, desc="layer study", unit="step", leave=False,
                            dynamic_ncols=True)

    def run(self, label: str, fn: Callable[[], Any]) -> Any:
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=True)
        if self.callback is not None:
            self.callback(label)
        t0 = time.perf_counter()
        out = fn()
        self.timings[label] = time.perf_counter() - t0
        if self.bar is not None:
            self.bar.update(1)
        return out

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _loss_and_gradient(H: Hessian) -> tuple[float, torch.Tensor]:
    with warnings.catch_warnings():  # the engine converts the loss with float(): harmless
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
        return H.loss_and_gradient()


def layer_study(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
    data: Any,
    *,
    k: int = 5,
    density_probes: int = 2,
    density_steps: int = 80,
    trace_rtol: float = 0.02,
    trace_max_hvp: int = 600,
    eig_tol: float = 1e-8,
    gn_tol: float = 1e-6,
    gauss_newton: bool = True,
    similarity_normalize: str = DEFAULT_NORMALIZE,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    layers: str | Mapping[str, Any] | None = None,
    path: str = "reverse",
    progress: bool | Callable[[str], None] = True,
) -> LayerStudy:
    """Run the layer study of ``model`` on ``data``.

    Args:
        model: the network (never modified).
        loss_fn: ``loss_fn(outputs, targets)`` -> mean loss of a batch (``loss_fn(outputs,
            batch)`` for mapping batches), or ``None`` for the model's own loss.
        data: a batch or an iterable of batches (e.g. the analysis subset): ``(inputs,
            targets)`` pairs or mappings (see :class:`hesslens.Hessian`).
        k: top eigenvalues per entry (the density deflates exactly these).
        density_probes, density_steps: SLQ probes and Lanczos steps per probe.
        trace_rtol: relative standard error at which the trace estimate stops (full network
            and every layer, from shared probes), or at ``trace_max_hvp`` products.
        eig_tol: relative a-posteriori tolerance of the Hessian eigenvalues (full and blocks;
            tight, so that the interlacing check is meaningful).
        gn_tol: tolerance of the Gauss-Newton and residual eigenvalues.
        gauss_newton: also measure the Gauss-Newton split of every entry.
        similarity_normalize: ``"top"``, ``"range"`` or ``"none"``: how spectra are put on a
            common scale before comparing them (see :mod:`hesslens.analysis.similarity`).
        seed: seeds every random start vector and probe.
        dtype, device: analyse a copy of the model in this dtype / on this device.
        layers: the blocks: ``None`` (one per module owning parameters, forward order),
            ``"transformer"`` / ``"transformer_heads"`` (q, k, v, o, mlp_in, mlp_out per layer),
            or your own ``{block: parameter names, glob patterns or ParamSlices}``.
        path: how Hessian products are computed (see :class:`hesslens.Hessian`). Pinned to
            ``"reverse"`` (double backward with the first-order graph reused) by default so
            that reruns give bitwise-identical numbers; ``"auto"`` times the candidates and may
            pick differently from run to run.
        progress: show a tqdm bar (``True``), nothing (``False``), or call
            ``progress(step_label)`` before each step.

    Returns:
        A :class:`LayerStudy`; ``.to_dict()`` gives the JSON layout.
    """
    k, density_probes, density_steps, trace_max_hvp, seed = _check_arguments(
        k, density_probes, density_steps, trace_max_hvp, trace_rtol, similarity_normalize, seed)
    H = Hessian(model, loss_fn, data, layers=layers, dtype=dtype, device=device, path=path)
    names = H.layers
    steps = _Steps(5 + len(names) + (2 + len(names) if gauss_newton else 0), progress)
    spectra = dict(k=k, n_probes=density_probes, n_steps=density_steps, seed=seed)
    try:
        loss, grad = steps.run("loss and gradient", lambda: _loss_and_gradient(H))
        measured = measure_curvature(
            H, layers=names, k=k, tol=eig_tol, trace=True, trace_rtol=trace_rtol,
            trace_max_hvp=trace_max_hvp, density=True, n_probes=density_probes,
            n_steps=density_steps, seed=seed, run=steps.run)
        full, layer_est = measured.full, measured.layers
        splits, gn_full_trace = _gauss_newton_splits(
            H, names, full, layer_est, steps, spectra, trace_rtol=trace_rtol,
            trace_max_hvp=trace_max_hvp, gn_tol=gn_tol, normalize=similarity_normalize,
            seed=seed) if gauss_newton else ({}, None)
        layer_sim, summary = steps.run("similarity", lambda: _similarities(
            names, full, layer_est, similarity_normalize))
    finally:
        steps.close()

    n_hvp = full.trace.n_hvp + full.n_hvp + sum(e.n_hvp for e in layer_est.values())
    if gn_full_trace is not None:
        n_hvp += gn_full_trace.n_hvp + sum(s.gn.n_hvp + s.residual.n_hvp
                                          for s in splits.values())
    settings = {
        "k": k,
        "density_probes": density_probes,
        "density_steps": density_steps,
        "density_deflation": "top-k eigenpairs",
        "density_probe_distribution": "rademacher",
        "trace_method": "hutch++ (shared probes, adaptive)",
        "trace_rtol": trace_rtol,
        "trace_max_hvp": trace_max_hvp,
        "eig_tol": eig_tol,
        "gn_tol": gn_tol,
        "gauss_newton": bool(gauss_newton),
        "similarity_normalize": similarity_normalize,
        "similarity_metric": "wasserstein",
        "seed": seed,
        "dtype": str(H.dtype).replace("torch.", ""),
        "device": str(H.device),
        "batchnorm": "eval",
        "product_path": path,
    }
    return LayerStudy(
        full=StudyEntry(name="full", hessian=full, gauss_newton=splits.get("full"),
                        similarity=summary),
        layers=_layer_entries(H, names, full, layer_est, splits, layer_sim),
        settings=settings,
        loss=float(loss),
        grad_norm=float(grad.norm()),
        num_samples=H.num_samples,
        timings=steps.timings,
        n_hvp=int(n_hvp),
    )


def _check_arguments(k: Any, density_probes: Any, density_steps: Any, trace_max_hvp: Any,
                     trace_rtol: Any, similarity_normalize: Any, seed: Any
                     ) -> tuple[int, int, int, int, int]:
    """The study's counts and seed as ints, or an error naming the first bad argument."""
    counts = (check_positive_int(k, "k"),
              check_positive_int(density_probes, "density_probes"),
              check_positive_int(density_steps, "density_steps"),
              check_positive_int(trace_max_hvp, "trace_max_hvp"))
    check_positive_number(trace_rtol, "trace_rtol")
    if similarity_normalize not in NORMALIZATIONS:
        raise HesslensInputError(
            f"unknown similarity normalisation {similarity_normalize!r}; choose one of: "
            f"{', '.join(NORMALIZATIONS)}"
        )
    return (*counts, check_int(seed, "seed"))


def _gauss_newton_splits(
    H: Hessian, names: list[str], full: SpectrumEstimate, layer_est: Mapping[str, SpectrumEstimate],
    steps: _Steps, spectra: dict[str, Any], *, trace_rtol: float, trace_max_hvp: int,
    gn_tol: float, normalize: str, seed: int,
) -> tuple[dict[str, GaussNewtonSplit], Any]:
    """The split ``Hess = G + (Hess - G)`` of the full Hessian and of every layer's block:
    ``G``'s traces from shared probes (as the Hessian's), then per entry the top eigenvalues,
    traces and densities of ``G`` and of the residual. Returns ``({entry: split}, G's full
    trace)``."""
    G = H.gauss_newton()
    gn_full_trace, gn_layer_traces = steps.run(
        "Gauss-Newton traces (shared probes)",
        lambda: G.traces(rtol=trace_rtol, max_hvp=trace_max_hvp, seed=seed))
    ops = {"full": H, **{name: H.block(name) for name in names}}
    ests = {"full": full, **layer_est}
    gn_traces = {"full": gn_full_trace, **gn_layer_traces}
    splits = {}
    for name, op in ops.items():
        est = ests[name]
        splits[name] = steps.run(f"{name}: Gauss-Newton split", lambda op=op, est=est,
                                 name=name: gauss_newton_split(
            op, tol=gn_tol, gn_trace=gn_traces[name], hessian_trace=est.trace,
            hessian_top=est.top_eigenvalues[0], hessian_density=est.density,
            normalize=normalize, **spectra))
    return splits, gn_full_trace


def _similarities(names: list[str], full: SpectrumEstimate,
                  layer_est: Mapping[str, SpectrumEstimate], normalize: str
                  ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Each layer's distances to the full spectrum, and the ranking of the layers by them."""
    out = {name: compare_spectra(est.density, full.density, normalize)
           for name, est in layer_est.items()}
    summary = summarize_similarity(names, [out[n]["wasserstein"] for n in names],
                                   metric="wasserstein", normalize=normalize)
    return out, summary


def _layer_entries(H: Hessian, names: list[str], full: SpectrumEstimate,
                   layer_est: Mapping[str, SpectrumEstimate],
                   splits: Mapping[str, GaussNewtonSplit], layer_sim: Mapping[str, Any]
                   ) -> dict[str, LayerEntry]:
    """Every layer's entry: its measurements, depth, size, ratios to the full network and the
    interlacing check."""
    depth = depths(len(names))
    full_top = full.top_eigenvalues[0]
    full_trace = float(full.trace.value)
    entries = {}
    for i, name in enumerate(names):
        est = layer_est[name]
        entries[name] = LayerEntry(
            name=name,
            hessian=est,
            gauss_newton=splits.get(name),
            similarity=layer_sim[name],
            index=i,
            depth=depth[i],
            parameters=H.layer_parameters[name],
            top_ratio=est.top_eigenvalues[0] / full_top if full_top != 0 else None,
            trace_ratio=(float(est.trace.value) / full_trace
                         if est.trace is not None and full_trace != 0 else None),
            interlacing=interlacing(est, full),
        )
    return entries
