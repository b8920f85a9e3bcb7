"""One memory budget per operator, from which the estimators' vectors (the Lanczos basis, the
trace sketch and probe batches, the groups of density probes), the product chunks and the
graph cache all derive.

``memory=`` on the operators:

* ``None`` (default): lean where vectors are large. The estimators keep at most
  ``max(64 MiB, 6 vectors)`` of their own vectors (a small model keeps every Lanczos vector and
  a full trace sketch, as fast as it gets; a 10M-parameter one restarts in a few vectors, and
  its top eigenvalue keeps none: the three-term recurrence), the graph cache takes up to
  4 GiB and a chunk of batched products 256 MiB. On a large model a batch whose forward pass
  saves more than a parameter copy for backward runs in chunks of rows that save about half
  of one, their graphs rebuilt for every product (slower, and the products' activations stay
  below a gradient's). On a GPU a Lanczos basis that would take more than half its free
  memory is kept on the CPU instead.
* ``"auto"``: half of the memory the device has available now (``MemAvailable`` on the CPU,
  ``torch.cuda.mem_get_info`` on a GPU), split below.
* bytes: half for the estimators' vectors, 40 % for the graph cache, 10 % for product chunks.

Example:
    >>> budget = MemoryBudget.of(None, vector_bytes=40_000_000)
    >>> budget.vectors, budget.ncv(k=5, dim=10_000_000, steps=150), budget.trace()
    (6, 9, (4, 1))
    >>> budget.ncv(k=1, dim=10_000_000, steps=100)  # no basis: the three-term recurrence
    0
    >>> MemoryBudget.of(None, vector_bytes=4_000).ncv(k=1, dim=1000, steps=100) is None
    True
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from hesslens.errors import HesslensInputError

__all__ = ["MemoryBudget", "available_memory"]

#: The estimators may always keep this many bytes of vectors (small operators: every vector).
FLOOR_BYTES = 64 * 2**20
#: ... and at least this many vectors (large operators: the lean defaults).
LEAN_VECTORS = 6
#: ``memory="auto"``: this share of the device's available memory.
AUTO_FRACTION = 0.5
GRAPH_CACHE_BYTES = 4 * 2**30
PRODUCT_BYTES = 2**28


def available_memory(device: torch.device | str) -> int:
    """Bytes the device has available now: free GPU memory, or the CPU's ``MemAvailable``."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


@dataclass(frozen=True)
class MemoryBudget:
    """The bytes an operator's estimators may keep in vectors of ``vector_bytes`` each
    (``estimator_bytes``), the most its graph cache holds and the estimated temporaries of one
    chunk of batched products."""

    vector_bytes: int
    estimator_bytes: int
    graph_cache_bytes: int
    product_bytes: int
    #: Where set (lean, ``memory=None`` on a large model): batches whose forward pass saves
    #: more than twice this for backward run in chunks of rows that save about this much,
    #: without a graph cache (:meth:`hesslens.curvature.loop.DataLoop.split_rows`).
    chunk_saved_bytes: int | None = None

    @classmethod
    def of(cls, memory: int | str | None, vector_bytes: int,
           device: torch.device | str = "cpu") -> MemoryBudget:
        """The budget for ``memory`` (``None``, ``"auto"`` or bytes; see the module)."""
        vector_bytes = max(int(vector_bytes), 1)
        if memory is None:
            lean = LEAN_VECTORS * vector_bytes > FLOOR_BYTES
            return cls(vector_bytes, max(FLOOR_BYTES, LEAN_VECTORS * vector_bytes),
                       GRAPH_CACHE_BYTES, PRODUCT_BYTES,
                       chunk_saved_bytes=vector_bytes // 2 if lean else None)
        if memory == "auto":
            total = int(AUTO_FRACTION * available_memory(device))
        elif isinstance(memory, int) and not isinstance(memory, bool) and memory > 0:
            total = memory
        else:
            raise HesslensInputError(
                f"memory must be a positive number of bytes, 'auto' or None, not {memory!r}")
        return cls(vector_bytes, total // 2, int(0.4 * total), max(total // 10, 1))

    @property
    def vectors(self) -> int:
        """How many vectors the estimators may keep (at least 3)."""
        return max(3, self.estimator_bytes // self.vector_bytes)

    def ncv(self, k: int, dim: int, steps: int, vector_later: bool = True) -> int | None:
        """The Lanczos basis for ``k`` eigenvalues within ``steps`` products: ``None`` (eigsh's
        own default) where that fits the budget; for ``k = 1`` else none at all (``0``: the
        three-term recurrence, as few products as a full basis, its vector formed later by a
        second pass) unless the vector is wanted with the value (``vector_later=False``); else
        fewer vectors, at least ``k + 4``."""
        rows = self.vectors
        if (min(steps, dim) + 1) <= rows:
            return None  # every Lanczos vector fits: no restart
        if k == 1 and vector_later:
            return 0
        default = min(dim, max(k + 2, min(max(2 * k + 8, 20), 31 - k)))
        if default + 1 + k <= rows:
            return None
        return min(dim, max(k + 4, rows - 1))

    def basis_device(self, rows: int, device: torch.device) -> torch.device | None:
        """Where a basis of ``rows`` vectors goes: ``None`` (the operator's device) unless
        that is a GPU without room for it beside the products (half its free memory), then the
        CPU, in float32."""
        if device.type != "cuda":
            return None
        if rows * self.vector_bytes <= available_memory(device) // 2:
            return None
        return torch.device("cpu")

    def trace(self) -> tuple[int, int] | None:
        """``(sketch_rank, batch_size)`` of the trace estimators: ``None`` (their defaults: a
        16-vector sketch, batches of up to 16 probes) where those fit, else a smaller sketch
        and one probe at a time."""
        rows = self.vectors
        if rows >= 16 + 2 * 16:
            return None
        batch = max(1, min(16, (rows - 16) // 2)) if rows > 18 else 1
        return max(0, min(16, rows - 2 * batch)), batch

    def deflation(self, wanted: int) -> int:
        """How many eigenpairs a density deflates: ``wanted`` where its basis fits, else 5."""
        return wanted if self.ncv(wanted, 2**62, 10**9) is None else min(wanted, 5)

    def density_group(self, n_probes: int, deflate: int) -> int | None:
        """Density probes run together (three vectors each, beside the deflation vectors):
        ``None`` (SLQ's default) where all of them fit."""
        group = max(1, min(n_probes, (self.vectors - deflate) // 3))
        return None if group >= n_probes else group
