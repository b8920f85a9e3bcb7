"""What the layer study measures on one curvature operator: its top eigenvalues and its
eigenvalue density (deflated with those same eigenpairs), as one record.

Example:
    >>> import torch, hesslens as hl
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> H = hl.Hessian(model, torch.nn.functional.cross_entropy,
    ...                (torch.randn(32, 4), torch.randint(0, 3, (32,))))
    >>> s = measure_spectrum(H, k=3, n_probes=2, n_steps=20)
    >>> len(s.top_eigenvalues), round(float(s.density.weights.sum()), 12)
    (3, 1.0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hesslens.linalg import EigenResult, Spectrum, TraceResult, block_traces, slq

__all__ = [
    "CurvatureMeasurement",
    "SpectrumEstimate",
    "measure_curvature",
    "measure_spectrum",
    "top_eigenpairs",
]


@dataclass(eq=False)
class SpectrumEstimate:
    """One operator's top eigenvalues, trace and density.

    Attributes:
        top: the Lanczos result (values descending for ``which="LA"``; vectors kept for
            reuse, e.g. deflation).
        density: the SLQ spectral measure, deflated with ``top``'s eigenpairs (``None`` where
            no density was asked for).
        trace: the trace estimate, where one was made.
        dim: the operator's size.
        tol: the eigenvalue tolerance used.
        n_hvp: operator products for the eigenvalues and the density.
    """

    top: EigenResult
    density: Spectrum | None
    trace: TraceResult | None
    dim: int
    tol: float
    n_hvp: int = 0

    @property
    def top_eigenvalues(self) -> list[float]:
        """The top eigenvalues as plain floats, in the result's order."""
        return [float(v) for v in self.top.values]

    def eigensolver_dict(self) -> dict[str, Any]:
        """How accurate the eigenvalues are: residuals, error bounds, convergence, cost."""
        info = self.top.to_dict()
        info.pop("values")
        info["tol"] = self.tol
        return info

    def to_dict(self) -> dict[str, Any]:
        """``{"dim", "top_eigenvalues", "eigensolver", "trace", "density"}`` (JSON-ready)."""
        return {
            "dim": int(self.dim),
            "top_eigenvalues": self.top_eigenvalues,
            "eigensolver": self.eigensolver_dict(),
            "trace": None if self.trace is None else self.trace.to_dict(),
            "density": None if self.density is None else self.density.to_dict(),
        }


def top_eigenpairs(op: Any, k: int, *, tol: float, seed: int, which: str = "LA") -> EigenResult:
    """``op.eigenvalues`` with ``k`` capped at the operator's size, vectors included."""
    return op.eigenvalues(k=max(1, min(int(k), op.dim)), which=which, tol=tol, seed=seed,
                          return_vectors=True)


def measure_spectrum(
    op: Any,
    *,
    k: int = 5,
    n_probes: int = 2,
    n_steps: int = 80,
    tol: float = 1e-8,
    which: str = "LA",
    seed: int = 0,
    trace: TraceResult | None = None,
    top: EigenResult | None = None,
    density: bool = True,
) -> SpectrumEstimate:
    """Top-``k`` eigenpairs, then the SLQ density deflated with exactly those eigenpairs (each
    product computed once: the density reuses the eigenvectors instead of recomputing them).

    Args:
        op: a curvature operator (or any :mod:`hesslens.linalg` operator with ``eigenvalues``).
        k: eigenpairs to compute and deflate.
        n_probes, n_steps: SLQ probes and Lanczos steps per probe (capped at the size).
        tol: relative tolerance of the eigenvalues (a-posteriori error bound).
        which: ``"LA"`` (largest) or ``"LM"`` (largest magnitude, for indefinite parts).
        seed: seed of the Lanczos start vector and of the probes.
        trace: a trace estimate made elsewhere (shared probes), stored alongside.
        top: eigenpairs already computed (skips the eigenvalue step).
        density: ``False`` stops after the eigenvalues (``density`` is then ``None`` and the
            eigenvectors are not kept).
    """
    if top is None:
        if density:
            top = top_eigenpairs(op, k, tol=tol, seed=seed, which=which)
        else:
            top = op.eigenvalues(k=max(1, min(int(k), op.dim)), which=which, tol=tol,
                                 seed=seed, return_vectors=False)
    rank = len(top)
    spectrum: Spectrum | None = None
    n_hvp = 0
    if not density:
        pass
    elif rank >= op.dim:
        spectrum = Spectrum.from_eigenvalues(top.values)
    else:
        steps = max(1, min(int(n_steps), op.dim - rank))
        spectrum, n_hvp = slq(op, n_probes=n_probes, n_steps=steps, seed=seed, deflate=top)
    return SpectrumEstimate(top=top, density=spectrum, trace=trace, dim=int(op.dim), tol=tol,
                            n_hvp=int(top.n_hvp) + int(n_hvp))


@dataclass(eq=False)
class CurvatureMeasurement:
    """The full operator's and each layer block's :class:`SpectrumEstimate`, measured together
    by :func:`measure_curvature`.

    Attributes:
        full: the full operator's estimate.
        layers: ``{layer name: estimate}`` in the operator's layer order (empty when layers
            were not asked for).
        n_hvp: operator products used in all.
    """

    full: SpectrumEstimate
    layers: dict[str, SpectrumEstimate]
    n_hvp: int


def _call(label: str, fn: Callable[[], Any]) -> Any:
    return fn()


def measure_curvature(
    op: Any,
    *,
    layers: bool | Sequence[str] = True,
    k: int = 5,
    tol: float = 1e-8,
    trace: bool = True,
    trace_rtol: float = 0.02,
    trace_max_hvp: int = 600,
    density: bool = True,
    n_probes: int = 2,
    n_steps: int = 80,
    seed: int = 0,
    run: Callable[[str, Callable[[], Any]], Any] = _call,
) -> CurvatureMeasurement:
    """The one measurement of "full and per-layer spectra" that the layer study and the
    curvature tracker share: top-``k`` eigenvalues of the operator and of every layer block,
    the traces (all layers from the full operator's probes, so they add up to it), and
    optionally the densities, each deflated with the eigenpairs just computed.

    Args:
        op: a curvature operator (:class:`hesslens.Hessian` or one of its relatives).
        layers: ``True`` for every layer of ``op``, ``False`` for none, or a list of names.
        k, tol: eigenvalues per entry and their relative a-posteriori tolerance.
        trace, trace_rtol, trace_max_hvp: measure the traces (Hutch++ with shared probes) to
            this relative standard error or this many products.
        density, n_probes, n_steps: measure the SLQ densities with these probes and steps.
        seed: seed of every start vector and probe.
        run: ``run(label, fn)`` calls ``fn()`` for each step (the layer study times them and
            shows its progress through it).

    Example:
        >>> import torch, hesslens as hl
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
        ...                             torch.nn.Linear(8, 3))
        >>> H = hl.Hessian(model, torch.nn.functional.cross_entropy,
        ...                (torch.randn(32, 4), torch.randint(0, 3, (32,))))
        >>> m = measure_curvature(H, k=1, tol=1e-6, density=False)
        >>> list(m.layers), m.full.density is None
        (['0', '2'], True)
        >>> total = sum(e.trace.value for e in m.layers.values())
        >>> abs(total - m.full.trace.value) < 1e-6 * abs(m.full.trace.value)
        True
    """
    if layers is True:
        names = list(op.layers)
    elif layers is False or layers is None:
        names = []
    else:
        names = list(layers)
    vectors = bool(density)
    full_top = run("full: top eigenvalues", lambda: op.eigenvalues(
        k=max(1, min(int(k), op.dim)), tol=tol, seed=seed, return_vectors=vectors))
    full_trace: TraceResult | None = None
    layer_traces: dict[str, TraceResult] = {}
    n_hvp = 0
    if trace and names:
        full_trace, layer_traces = run("traces (shared probes)", lambda: op.traces(
            rtol=trace_rtol, max_hvp=trace_max_hvp, seed=seed))
    elif trace:  # the full trace alone stops on its own error, not on every block's
        full_trace = run("trace", lambda: block_traces(op, None, rtol=trace_rtol,
                                                       max_hvp=trace_max_hvp, seed=seed)[0])
    if full_trace is not None:
        n_hvp += int(full_trace.n_hvp)
    spectra = dict(k=k, n_probes=n_probes, n_steps=n_steps, seed=seed, tol=tol, density=density)
    full = run("full: density" if density else "full: eigenvalues", lambda: measure_spectrum(
        op, trace=full_trace, top=full_top, **spectra))
    n_hvp += full.n_hvp
    per_layer: dict[str, SpectrumEstimate] = {}
    label = "eigenvalues + density" if density else "eigenvalues"
    for name in names:
        block = op.block(name)
        per_layer[name] = run(f"{name}: {label}", lambda block=block, name=name:
                              measure_spectrum(block, trace=layer_traces.get(name), **spectra))
        n_hvp += per_layer[name].n_hvp
    return CurvatureMeasurement(full=full, layers=per_layer, n_hvp=n_hvp)
