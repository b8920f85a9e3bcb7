"""The layer study: spectra of the full Hessian and of every layer's block, how alike they
are, and the Gauss-Newton split of each.

* :func:`layer_study` -> :class:`LayerStudy` (``.to_dict()`` is the ``results.json`` layout);
* :mod:`hesslens.analysis.similarity` -- distances between spectral measures (Wasserstein-1 on a
  common scale, Jensen-Shannon on a shared grid), the authors' number for comparison, ranking
  of layers by depth;
* :mod:`hesslens.analysis.gauss_newton` -- ``Hess = G + (Hess - G)`` per entry.

Importing this package also registers :func:`~hesslens.analysis.similarity.spectrum_similarity`
as the training tracker's default similarity (when the training package is present).
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
from hesslens.analysis.spectra import SpectrumEstimate, measure_spectrum, top_eigenpairs
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
    "measure_spectrum",
    "normalize_spectrum",
    "rank_layers",
    "residual_trace",
    "spectrum_similarity",
    "summarize_similarity",
    "top_eigenpairs",
    "wasserstein",
]


def _register_tracker_similarity() -> None:
    try:
        from hesslens.training.tracking import register_similarity
    except ImportError:  # the training package is optional here
        return
    register_similarity(spectrum_similarity)


_register_tracker_similarity()
