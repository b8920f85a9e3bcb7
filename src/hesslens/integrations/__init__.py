"""Curvature tracking inside other libraries' training loops.

* :mod:`hesslens.integrations.hf` -- ``CurvatureCallback`` for ``transformers.Trainer``
  (``pip install hesslens[hf]``);
* :mod:`hesslens.integrations.lightning` -- ``CurvatureCallback`` for Lightning
  (``pip install hesslens[lightning]``).

Each imports its library only when it is imported itself; ``import hesslens`` imports neither.
Both record with :class:`hesslens.CurvatureTracker` and expose its ``history`` and
``write_report``.
"""
