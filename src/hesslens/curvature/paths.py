"""Which product path computes a matrix's products: a strategy beside the operator.

A matrix may have several exact ways to multiply (the Hessian: double backward on a kept graph,
one vector at a time or batched; forward-over-reverse, vmapped). :class:`PathChoice` keeps,
per call shape (``"single"``: one vector, ``"batched"``: several), the path to use: pinned by
the user, or timed on the first products of that shape (on their first few vectors) and the
fastest kept for every later call. The products of the timed candidates are the first rows of
the result, so timing spends only the products of the discarded candidates
(``calibration_products``).

Example:
    >>> import torch
    >>> choice = PathChoice()
    >>> run = lambda path, rows, out: out.copy_(rows * (2.0 if path == "a" else 2.0))
    >>> choice.products("batched", ["a", "b"], torch.ones(3, 2), run).tolist()
    [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
    >>> choice.chosen["batched"] in ("a", "b"), choice.calibration_products
    (True, 3)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: ``run(path, rows, out)``: the products of the (m, n) ``rows`` by ``path``, written into the
#: (m, n) ``out`` (and returned).
Run = Callable[[str, Tensor, Tensor], Tensor]

#: How many vectors the candidates are timed on.
TIMED_VECTORS = 4


class PathChoice:
    """The path chosen per call shape, and how it was chosen (``timings`` in seconds)."""

    def __init__(self) -> None:
        self.chosen: dict[str, str] = {}
        self.timings: dict[str, dict[str, float]] = {}
        self.calibration_products = 0

    def products(self, shape: str, candidates: Sequence[str], V: Tensor, run: Run,
                 out: Tensor | None = None) -> Tensor:
        """The products of the (k, n) ``V`` by the path chosen for ``shape`` (into ``out``,
        default a zeroed tensor like ``V``); the first call of a shape with several
        ``candidates`` times them."""
        out = torch.zeros_like(V) if out is None else out
        if shape in self.chosen:
            return run(self.chosen[shape], V, out)
        if len(candidates) == 1:
            self.chosen[shape] = candidates[0]
            return run(candidates[0], V, out)
        return self._time(shape, candidates, V, run, out)

    def _time(self, shape: str, candidates: Sequence[str], V: Tensor, run: Run,
              out: Tensor) -> Tensor:
        """Time every candidate on the first few vectors, keep the fastest for the rest and for
        later calls. The fastest candidate's products so far are kept in the head of ``out``, a
        slower one's are dropped at once: one extra (m, n) block at most, not one per path."""
        m = min(V.shape[0], TIMED_VECTORS)
        head = out[:m]
        timings: dict[str, float] = {}
        failures: list[BaseException] = []
        for candidate in candidates:
            _synchronize(V.device)
            start = time.perf_counter()
            try:
                # the first candidate writes into the result, the others into a scratch block
                products = run(candidate, V[:m], head if not timings else torch.empty_like(head))
            except (RuntimeError, NotImplementedError) as err:
                # e.g. forward-mode AD is not implemented for mse_loss's backward: that path
                # is simply not a candidate for this model and loss
                failures.append(err)
                continue
            _synchronize(V.device)
            elapsed = time.perf_counter() - start
            if timings and elapsed < min(timings.values()):
                head.copy_(products)
            timings[candidate] = elapsed
            del products
        if not timings:
            raise failures[0]
        best = min(timings, key=timings.get)
        self.chosen[shape] = best
        self.timings[shape] = timings
        self.calibration_products += (len(timings) - 1) * m
        if m < V.shape[0]:
            run(best, V[m:], out[m:])
        return out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
