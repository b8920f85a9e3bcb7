"""One failure, every rank: the status slots that travel with the engine's all-reduces.

Under ``torch.distributed`` every rank runs the same estimators on its own shard of the data, so
an error raised by the data of one rank only (a :class:`~hesslens.errors.DataChangedError`, a
loss that is not finite on its shard, running out of memory) would leave the other ranks waiting
forever in the next all-reduce. Each reduced buffer therefore ends with one status slot per kind
of failure: a rank that fails fills its slot instead of skipping the collective, and after the
all-reduce every rank raises the same named error (the failing rank its own).

Example:
    >>> import torch
    >>> buf = torch.zeros(3 + STATUS_SLOTS)
    >>> mark_failure(buf, None) is None, buf[-STATUS_SLOTS:].tolist()
    (True, [0.0, 0.0, 0.0, 0.0])
    >>> remote_failure([0.0, 2.0, 0.0, 0.0])
    NonFiniteCurvatureError('2 other ranks stopped with a NonFiniteCurvatureError (their own \
message says why); every rank stops here instead of waiting for them in a collective')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from hesslens.errors import DataChangedError, HesslensInputError, NonFiniteCurvatureError

#: The kinds of failure a rank reports, most specific first (any other error is the last).
KINDS: tuple[type[BaseException], ...] = (DataChangedError, NonFiniteCurvatureError,
                                          HesslensInputError, Exception)
STATUS_SLOTS = len(KINDS)


def mark_failure(buf: Tensor, failure: BaseException | None) -> None:
    """Zero the status slots at the end of ``buf`` (1-D) and set the one of ``failure``."""
    status = buf[-STATUS_SLOTS:]
    status.zero_()
    if failure is not None:
        status[next(i for i, kind in enumerate(KINDS) if isinstance(failure, kind))] = 1


def remote_failure(flags: Sequence[float]) -> BaseException | None:
    """The error this rank raises for the failures the other ranks reported, or None."""
    for kind, count in zip(KINDS, flags):
        if count > 0:
            n = round(count)
            cls = kind if kind is not Exception else RuntimeError
            return cls(f"{n} other rank{'s' if n > 1 else ''} stopped with a "
                       f"{kind.__name__ if kind is not Exception else 'error'} (their own "
                       "message says why); every rank stops here instead of waiting for them "
                       "in a collective")
    return None


def all_reduce_checked(buf: Tensor, failure: BaseException | None, group: Any) -> Tensor:
    """Sum the 1-D ``buf`` (its last :data:`STATUS_SLOTS` entries the status) over ``group``
    in place, then raise on every rank if any rank failed: ``failure`` itself on the rank that
    had it, the same kind of error (:func:`remote_failure`) on the others."""
    import torch.distributed as dist

    mark_failure(buf, failure)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    if failure is not None:
        raise failure
    error = remote_failure(buf[-STATUS_SLOTS:].tolist())
    if error is not None:
        raise error
    return buf
