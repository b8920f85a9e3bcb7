"""The estimators' memory budget: how many vectors of an operator's size they hold at once.

Every algorithm here keeps some ``dim``-length vectors besides what a product needs: a batch of
trace probes and their products, a group of SLQ runs, a Lanczos basis. On small operators they
take what is fastest; on large ones these bounds keep the total to a fixed number of copies of
the vector (the table is in ``benchmarks/README.md``, measured by ``bench_memory.py``):

* :data:`WORK_BYTES` -- the probes multiplied together and their products (``block_traces``,
  ``hutchinson``, ``hutchpp``: 2 vectors a probe; ``slq``: 3 vectors a run).
* :data:`BASIS_VECTORS` -- ``eigsh`` with ``ncv=None`` on a large operator restarts in a basis
  of ``max(2k + 8, 20)`` vectors, lowered (not below ``k + 2``) to this many less ``k + 1``,
  so that the basis, its step temporaries and the ``k`` Ritz vectors (formed in place in the
  basis) stay below this many.

Example:
    >>> import torch
    >>> vectors_within(WORK_BYTES, 10_000_000, torch.float32, per=2, at_most=16)
    3
    >>> vectors_within(WORK_BYTES, 1000, torch.float32, per=2, at_most=16)
    16
"""

from __future__ import annotations

import torch

#: Bytes of probes and products multiplied together (see the module docstring).
WORK_BYTES = 2**28

#: Bound on the basis vectors of a restarted eigsh on a large operator (see above).
BASIS_VECTORS = 32


def vectors_within(nbytes: int, dim: int, dtype: torch.dtype, per: int = 1,
                   at_most: int | None = None) -> int:
    """How many items of ``per`` vectors of ``dim`` entries of ``dtype`` fit in ``nbytes``:
    at least 1, at most ``at_most``."""
    itemsize = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 8
    count = nbytes // max(per * dim * itemsize, 1)
    if at_most is not None:
        count = min(count, at_most)
    return int(max(1, count))
