"""The layer study: spectra of the full Hessian and of every layer's block, how alike they
are, and the Gauss-Newton split of each.

* :func:`layer_study` -> :class:`LayerStudy` (``.to_dict()`` is the ``results.json`` layout);
* :mod:`hesslens.analysis.similarity` -- distances between spectral measures (Wasserstein-1 on a
  common scale, Jensen-Shannon on a shared grid), the authors' number for comparison, ranking
  of layers by depth;
* :mod:`hesslens.analysis.gauss_newton` -- ``Hess = G + (Hess - G)`` per entry.
"""

from hesslens.analysis.gauss_newton import GaussNewtonSplit, gauss_newton_split, residual_trace
from hesslens.analysis.similarity import (
    DEFAULT_NORMALIZE,
    NORMALIZATIONS,
    authors_distance,
    compare_spectra,
    depths,
    js_divergence,
    normalize_spectrum,
    rank_layers,
    spectrum_similarity,
    summarize_similarity,
    wasserstein,
)
from hesslens.analysis.spectra import (
    CurvatureMeasurement,
    SpectrumEstimate,
    measure_curvature,
    measure_spectrum,
    top_eigenpairs,
)
from hesslens.analysis.study import (
    SCHEMA,
    LayerEntry,
    LayerStudy,
    StudyEntry,
    interlacing,
    layer_study,
)

__all__ = [
    "DEFAULT_NORMALIZE",
    "NORMALIZATIONS",
    "SCHEMA",
    "CurvatureMeasurement",
    "GaussNewtonSplit",
    "LayerEntry",
    "LayerStudy",
    "SpectrumEstimate",
    "StudyEntry",
    "authors_distance",
    "compare_spectra",
    "depths",
    "gauss_newton_split",
    "interlacing",
    "js_divergence",
    "layer_study",
    "measure_curvature",
    "measure_spectrum",
    "normalize_spectrum",
    "rank_layers",
    "residual_trace",
    "spectrum_similarity",
    "summarize_similarity",
    "top_eigenpairs",
    "wasserstein",
]

