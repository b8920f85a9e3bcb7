"""Data for curvature operators: one batch or many, weighted so that the operator is that of
the mean loss over all samples.

``data`` is either one ``(inputs, targets)`` pair or an iterable of such pairs (a list, a
DataLoader). Inputs may be a tensor or a tuple of tensors (passed as positional arguments to the
model); the batch size is the length of the targets. Over several batches the loss is
``sum_b (n_b / N) * loss_fn(model(x_b), y_b)``: the mean over all ``N`` samples when ``loss_fn``
returns a batch mean, a smaller last batch included exactly.

Example:
    >>> import torch
    >>> batches = [(torch.zeros(3, 2), torch.zeros(3)), (torch.zeros(1, 2), torch.zeros(1))]
    >>> source = BatchSource(batches)
    >>> source.num_samples, [round(w, 2) for w in source.weights]
    (4, [0.75, 0.25])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from hesslens.errors import HesslensInputError

Batch = tuple[Any, torch.Tensor]


def _is_single_batch(data: object) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], torch.Tensor)
        and (isinstance(data[0], torch.Tensor) or _is_tensor_tuple(data[0]))
    )


def _is_tensor_tuple(obj: object) -> bool:
    return isinstance(obj, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in obj)


def _tensors(inputs: Any) -> Sequence[torch.Tensor]:
    return inputs if _is_tensor_tuple(inputs) else (inputs,)


class BatchSource:
    """The batches of an operator's data, their sizes and weights.

    A one-shot iterator (a generator) is read once and kept in memory; a re-iterable source (a
    list, a DataLoader) is iterated again for every pass, so a large DataLoader is never held in
    memory. Batch sizes are counted on the first pass, which also checks the data.
    """

    def __init__(self, data: object) -> None:
        if data is None:
            raise HesslensInputError(
                "data is None: pass (inputs, targets) or an iterable of batches"
            )
        if _is_single_batch(data):
            self._source: Iterable = [tuple(data)]
        elif isinstance(data, Iterator):
            self._source = list(data)
        elif isinstance(data, Iterable):
            self._source = data
        else:
            raise HesslensInputError(
                f"data of type {type(data).__name__} is neither an (inputs, targets) pair nor an "
                "iterable of such pairs"
            )
        self.sizes = [self._check(batch, i) for i, batch in enumerate(self._source)]
        if not self.sizes:
            raise HesslensInputError("data is empty: it yielded no batch")
        self.num_samples = sum(self.sizes)
        if self.num_samples == 0:
            raise HesslensInputError("data is empty: every batch has zero samples")
        self.weights = [size / self.num_samples for size in self.sizes]

    @property
    def in_memory(self) -> bool:
        """Whether the batches are held in a list (and so cheap to iterate again)."""
        return isinstance(self._source, (list, tuple))

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self) -> Iterator[tuple[Batch, float]]:
        count = 0
        for batch, weight in zip(self._source, self.weights):
            count += 1
            yield (batch[0], batch[1]), weight
        if count != len(self.sizes):
            raise HesslensInputError(
                f"the data yielded {count} batches now but {len(self.sizes)} before: curvature "
                "needs the same data on every pass (use a list or a DataLoader without drop_last "
                "randomness)"
            )

    def first(self) -> Batch:
        """The first batch."""
        batch = next(iter(self._source))
        return batch[0], batch[1]

    @staticmethod
    def _check(batch: object, index: int) -> int:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise HesslensInputError(
                f"batch {index} is a {type(batch).__name__}, not an (inputs, targets) pair"
            )
        inputs, targets = batch[0], batch[1]
        if not isinstance(targets, torch.Tensor) or not all(
            isinstance(t, torch.Tensor) for t in _tensors(inputs)
        ):
            raise HesslensInputError(f"batch {index}: inputs and targets must be torch tensors")
        size = int(targets.shape[0]) if targets.dim() > 0 else 1
        for tensor in _tensors(inputs):
            if tensor.dim() == 0 or tensor.shape[0] != size:
                raise HesslensInputError(
                    f"batch {index}: inputs have {tensor.shape[0] if tensor.dim() else 0} rows "
                    f"but targets have {size}"
                )
        return size


def move_batch(batch: Batch, device: torch.device, dtype: torch.dtype | None) -> Batch:
    """Move a batch to ``device``; cast floating inputs (and targets) to ``dtype`` if given."""

    def move(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    inputs, targets = batch
    if _is_tensor_tuple(inputs):
        inputs = tuple(move(t) for t in inputs)
    else:
        inputs = move(inputs)
    return inputs, move(targets)


def batch_device(batch: Batch) -> torch.device:
    """The device of a batch's first input tensor."""
    return _tensors(batch[0])[0].device


def as_args(inputs: Any) -> tuple:
    """The model's positional arguments for ``inputs``."""
    return tuple(inputs) if _is_tensor_tuple(inputs) else (inputs,)
