"""Algorithms on any batched symmetric matrix-vector product (no neural-network knowledge).

An operator is anything with ``dim``, ``dtype``, ``device`` and ``matmat(V)`` for a
``(k, dim)`` batch of row vectors (:class:`SymmetricOperator`); a dense square tensor works
too. On top of it:

* :func:`lanczos`, :func:`eigsh` -- Lanczos with full reorthogonalisation; extreme eigenvalues
  with a-posteriori error bounds, thick-restarted in a basis of at most ``ncv`` vectors.
* :func:`hutchinson`, :func:`hutchpp`, :class:`BlockTraceEstimator` -- trace estimators; the
  trace of every diagonal block from one shared set of probes, as an object that goes on with
  more probes when asked for more (:func:`block_traces`: one run of it).
* :func:`slq`, :class:`Spectrum` -- stochastic Lanczos quadrature (no stored basis for large
  problems) and spectral measures (densities, moments, Wasserstein and Jensen-Shannon
  distances).

Memory does not grow with the number of steps: each estimator's docstring gives it as a
formula in copies of ``dim`` (float32 vectors for a float32 operator, float64 for float64).
Every product is checked: a NaN or infinite one raises
:class:`~hesslens.errors.NonFiniteCurvatureError`; an estimator that runs out of its product
budget before its tolerance warns with :class:`~hesslens.errors.BudgetWarning`. The stopping
rules derive from the precision the products are computed in (:func:`product_eps`): bfloat16 or
float16 products never give a value marked converged beyond what they can resolve
(:mod:`hesslens.linalg.precision`, :class:`~hesslens.errors.PrecisionWarning`).

Example
-------
>>> import torch
>>> import hesslens.linalg as hla
>>> A = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))
>>> round(float(hla.eigsh(A, k=1).values[0]), 4)
50.0
>>> hla.hutchinson(A, n_hvp=10).value
1275.0
"""

from hesslens.linalg.lanczos import WHICH, LanczosRun, eigsh, lanczos
from hesslens.linalg.operator import (
    CountingOperator,
    DeflatedOperator,
    MatrixOperator,
    SymmetricOperator,
    as_operator,
    product_eps,
)
from hesslens.linalg.probes import DISTRIBUTIONS, random_probes
from hesslens.linalg.results import EigenResult, TraceResult
from hesslens.linalg.slq import slq
from hesslens.linalg.spectrum import Spectrum
from hesslens.linalg.trace import (
    BlockTraceEstimator,
    TraceState,
    block_traces,
    hutchinson,
    hutchpp,
)

__all__ = [
    "DISTRIBUTIONS",
    "WHICH",
    "BlockTraceEstimator",
    "CountingOperator",
    "DeflatedOperator",
    "EigenResult",
    "LanczosRun",
    "MatrixOperator",
    "Spectrum",
    "SymmetricOperator",
    "TraceResult",
    "TraceState",
    "as_operator",
    "block_traces",
    "eigsh",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "product_eps",
    "random_probes",
    "slq",
]
