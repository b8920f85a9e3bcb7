"""Data for curvature operators: the batches, how much each one weighs, and a check that the
data is the same on every pass.

``data`` is one batch or an iterable of batches (a list, a DataLoader). A batch is an
``(inputs, targets)`` pair (inputs a tensor or a tuple of tensors), a mapping of tensors
(Hugging Face style, the model is called as ``model(**batch)``), or any other pytree of tensors
(passed whole to the model when it computes its own loss). Over several batches the loss is
``sum_b (n_b / N) * loss_b`` where ``n_b`` is the number of loss terms of batch ``b``
(:mod:`hesslens.curvature.loss` counts them: samples, or label tokens for a language model's
own loss): the mean over all ``N`` terms when each batch's loss is a mean over its terms.

Every pass over a re-iterable source is checked against the first one (batch count, sizes and
a checksum of every tensor), so a shuffling or augmenting loader, which would mix several
matrices into one, is a :class:`~hesslens.errors.DataChangedError` instead of a silently wrong
number.

Example:
    >>> import torch
    >>> batches = [(torch.zeros(3, 2), torch.zeros(3)), (torch.zeros(1, 2), torch.zeros(1))]
    >>> source = BatchSource(batches)
    >>> source.num_terms, [round(w, 2) for w in source.weights]
    (4, [0.75, 0.25])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from hesslens.errors import DataChangedError, HesslensInputError
from hesslens.parallel import all_reduce_int

Batch = Any
TermCounter = Callable[[Batch], int]


def is_pair(batch: object) -> bool:
    """Whether ``batch`` is an ``(inputs, targets)`` pair of tensors (inputs may be a tuple)."""
    return (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and isinstance(batch[1], torch.Tensor)
        and (isinstance(batch[0], torch.Tensor) or _is_tensor_tuple(batch[0]))
    )


def _is_tensor_tuple(obj: object) -> bool:
    return isinstance(obj, (tuple, list)) and len(obj) > 0 and all(
        isinstance(t, torch.Tensor) for t in obj)


def tensors_of(batch: Batch) -> list[torch.Tensor]:
    """Every tensor in a batch (its pytree leaves), in a fixed order."""
    leaves, _ = tree_flatten(batch)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _is_single_batch(data: object) -> bool:
    if isinstance(data, torch.Tensor):
        return True
    if isinstance(data, Mapping):
        return bool(data) and all(isinstance(v, torch.Tensor) for v in data.values())
    return is_pair(data)


def leading_size(batch: Batch) -> int:
    """The batch size: the targets' rows for a pair, else the first dimension of the batch's
    labels (``"labels"``) or of its first tensor."""
    if is_pair(batch):
        targets = batch[1]
        return int(targets.shape[0]) if targets.dim() > 0 else 1
    if isinstance(batch, Mapping) and isinstance(batch.get("labels"), torch.Tensor):
        labels = batch["labels"]
        return int(labels.shape[0]) if labels.dim() > 0 else 1
    tensors = tensors_of(batch)
    return int(tensors[0].shape[0]) if tensors and tensors[0].dim() > 0 else 1


def fingerprint(batch: Batch) -> tuple:
    """A cheap summary of a batch that does not depend on the order of its samples: each
    tensor's shape, sum and sum of squares (float64)."""
    out = []
    for t in tensors_of(batch):
        x = t.detach().to(torch.float64)
        out.append((tuple(t.shape), float(x.sum()), float((x * x).sum())))
    return tuple(out)


def _same(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    for (sa, s1a, s2a), (sb, s1b, s2b) in zip(a, b):
        if sa != sb:
            return False
        for x, y in ((s1a, s1b), (s2a, s2b)):
            if abs(x - y) > 1e-9 * max(abs(x), abs(y), 1.0):
                return False
    return True


class BatchSource:
    """The batches of an operator's data, their loss-term counts and weights.

    A one-shot iterator (a generator) is read once and kept in memory; a re-iterable source (a
    list, a DataLoader) is iterated again for every pass, so a large DataLoader is never held in
    memory, and each pass is checked against the first (:class:`~hesslens.errors.DataChangedError`
    when a batch differs). ``count_terms(batch)`` gives a batch's number of loss terms (default:
    its batch size).
    """

    def __init__(self, data: object, count_terms: TermCounter | None = None,
                 group: Any = None) -> None:
        if data is None:
            raise HesslensInputError(
                "data is None: pass (inputs, targets), a mapping of tensors, or an iterable of "
                "batches"
            )
        if _is_single_batch(data):
            self._source: Iterable = [data]
        elif isinstance(data, Iterator):
            self._source = list(data)
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
            self._source = data
        else:
            raise HesslensInputError(
                f"data of type {type(data).__name__} is neither a batch ((inputs, targets), a "
                "mapping of tensors) nor an iterable of batches"
            )
        self._count = count_terms or leading_size
        self.terms: list[int] = []
        self._prints: list[tuple] = []
        failure = None
        try:
            self._read_terms()
        except Exception as err:
            if group is None:
                raise
            failure = err  # raised on every rank after the all-reduce below
        self.local_terms = sum(self.terms)
        # Under torch.distributed (group given) this rank's data is a shard: the weights are
        # shares of the loss terms of all shards together.
        self.num_terms = self.local_terms if group is None else all_reduce_int(
            self.local_terms, group, failure)
        if self.num_terms == 0:
            raise HesslensInputError(
                "data is empty: no batch has a loss term (no samples, or every label is -100)")
        # a batch without loss terms (every label ignored) weighs nothing: it is checked on
        # every pass but never evaluated (its mean loss would be 0/0)
        self.weights = [n / self.num_terms for n in self.terms if n > 0]

    def _read_terms(self) -> None:
        for i, batch in enumerate(self._source):
            self._check(batch, i)
            self.terms.append(self._terms_of(batch, i))
            if not self.in_memory:
                self._prints.append(fingerprint(batch))
        if not self.terms:
            raise HesslensInputError("data is empty: it yielded no batch")

    @property
    def sizes(self) -> list[int]:
        """Each batch's number of loss terms (kept under its old name)."""
        return list(self.terms)

    @property
    def num_samples(self) -> int:
        """The number of loss terms the loss averages over (samples, or label tokens)."""
        return self.num_terms

    @property
    def in_memory(self) -> bool:
        """Whether the batches are held in a list (cheap to iterate again, cannot change)."""
        return isinstance(self._source, (list, tuple))

    def __len__(self) -> int:
        """The number of batches with loss terms (those a pass yields)."""
        return len(self.weights)

    def __iter__(self) -> Iterator[tuple[Batch, float]]:
        """``(batch, weight)`` for every batch with loss terms, each pass checked against the
        first."""
        count, used = 0, 0
        for i, batch in enumerate(self._source):
            if i >= len(self.terms):
                count = i + 1
                break
            if not self.in_memory and not _same(fingerprint(batch), self._prints[i]):
                raise DataChangedError(
                    f"batch {i} differs from the first pass over the data (another size or "
                    "other values): a shuffling or augmenting DataLoader gives another matrix on "
                    "every pass. Pass a fixed dataset (a list of batches, or a DataLoader with "
                    "shuffle=False and no random transforms)"
                )
            count = i + 1
            if self.terms[i] > 0:
                yield batch, self.weights[used]
                used += 1
        if count != len(self.terms):
            raise DataChangedError(
                f"the data yielded {count} batches now but {len(self.terms)} before: curvature "
                "needs the same data on every pass (a list, or a DataLoader with shuffle=False "
                "and drop_last=False)"
            )

    def first(self) -> Batch:
        """The first batch."""
        return next(iter(self._source))

    def _terms_of(self, batch: Batch, index: int) -> int:
        n = self._count(batch)
        if isinstance(n, torch.Tensor):
            n = n.item()
        if not float(n).is_integer() or n < 0:
            raise HesslensInputError(
                f"batch {index}: the loss-term count must be a non-negative integer, got {n!r}")
        return int(n)

    @staticmethod
    def _check(batch: object, index: int) -> None:
        tensors = tensors_of(batch)
        if not tensors:
            raise HesslensInputError(
                f"batch {index} is a {type(batch).__name__} with no tensors: a batch is "
                "(inputs, targets), a mapping of tensors, or a pytree of tensors"
            )
        if leading_size(batch) == 0:
            raise HesslensInputError(
                f"batch {index} is empty (0 samples): its mean loss is 0/0. Drop empty batches "
                "from the data (e.g. the last one of a split that divides evenly)")
        if is_pair(batch):
            size = leading_size(batch)
            for tensor in _inputs_of(batch[0]):
                if tensor.dim() == 0 or tensor.shape[0] != size:
                    raise HesslensInputError(
                        f"batch {index}: inputs have {tensor.shape[0] if tensor.dim() else 0} "
                        f"rows but targets have {size}"
                    )
        elif (isinstance(batch, (tuple, list)) and len(batch) >= 2
              and not isinstance(batch[0], Mapping)
              and not all(isinstance(t, torch.Tensor) or _is_tensor_tuple(t) for t in batch)):
            raise HesslensInputError(
                f"batch {index}: inputs and targets must be torch tensors")


def _inputs_of(inputs: Any) -> list[torch.Tensor]:
    return list(inputs) if _is_tensor_tuple(inputs) else [inputs]


def move_batch(batch: Batch, device: torch.device, dtype: torch.dtype | None) -> Batch:
    """``batch`` on ``device``, floating tensors cast to ``dtype`` if given (structure kept)."""

    def move(t: object) -> object:
        if not isinstance(t, torch.Tensor):
            return t
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    if is_pair(batch):
        inputs, targets = batch
        inputs = tuple(move(t) for t in inputs) if _is_tensor_tuple(inputs) else move(inputs)
        return inputs, move(targets)
    return tree_map(move, batch)


def batch_device(batch: Batch) -> torch.device:
    """The device of a batch's first tensor."""
    return tensors_of(batch)[0].device


def take_rows(batch: Batch, rows: slice) -> Batch:
    """The same batch restricted to ``rows`` of every tensor with a leading dimension."""

    def cut(t: object) -> object:
        return t[rows] if isinstance(t, torch.Tensor) and t.dim() > 0 else t

    if is_pair(batch):
        inputs, targets = batch
        inputs = tuple(cut(t) for t in inputs) if _is_tensor_tuple(inputs) else cut(inputs)
        return inputs, cut(targets)
    return tree_map(cut, batch)


def as_args(inputs: Any) -> tuple:
    """The model's positional arguments for the ``inputs`` of a pair."""
    return tuple(inputs) if _is_tensor_tuple(inputs) else (inputs,)
