"""The :class:`Dataset` container and :func:`batches`; the seeded cuts of a data set
(:func:`split_train_val`, :func:`subset_indices`, :func:`analysis_subset`) live in
:mod:`hesslens.splits`, below the zoo and the trainer alike, and are re-exported here.

Everything here is deterministic: the same arguments and ``seed`` give the same examples in the
same order, and no function touches the global random state.

Example:
    >>> import torch
    >>> from hesslens.zoo.dataset import analysis_subset
    >>> x, y = torch.randn(100, 3), torch.arange(100) % 5
    >>> xs, ys = analysis_subset(x, y, per_class=2, seed=0)
    >>> torch.bincount(ys).tolist()
    [2, 2, 2, 2, 2]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from hesslens.checks import check_labels, check_positive_int, check_seed, check_xy
from hesslens.errors import HesslensInputError
from hesslens.splits import analysis_subset, split_train_val, subset_indices

__all__ = ["Dataset", "analysis_subset", "batches", "check_labels", "check_xy",
           "split_train_val", "subset_indices"]


@dataclass(eq=False)
class Dataset:
    """A classification data set held in memory as tensors.

    Attributes:
        name: the registry name (``"mnist1d"``, ``"cifar10"``, ...).
        x_train, x_test: float32 inputs of shape ``(N, *input_shape)``.
        y_train, y_test: int64 class labels in ``[0, num_classes)``, shape ``(N,)``.
        input_shape: one example's shape, e.g. ``(1, 40)`` or ``(3, 32, 32)``.
        num_classes: number of classes.
        mean, std: the per-channel statistics that were subtracted and divided out (computed
            on the training set), or ``None`` when the inputs were left unnormalised.

    >>> ds = Dataset("toy", torch.zeros(4, 1, 2), torch.tensor([0, 1, 0, 1]),
    ...              torch.zeros(2, 1, 2), torch.tensor([1, 0]), (1, 2), 2)
    >>> ds
    Dataset(name='toy', input_shape=(1, 2), num_classes=2, train=4, test=2)
    """

    name: str
    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    input_shape: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...] | None = field(default=None, repr=False)
    std: tuple[float, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(d) for d in self.input_shape)
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            check_xy(x, y, f"{self.name} {split}")
            if tuple(x.shape[1:]) != self.input_shape:
                raise HesslensInputError(
                    f"{self.name}: x_{split} has example shape {tuple(x.shape[1:])}, "
                    f"but input_shape is {self.input_shape}"
                )
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise HesslensInputError(
                    f"{self.name}: y_{split} holds labels {int(y.min())}..{int(y.max())}, "
                    f"outside [0, num_classes={self.num_classes})"
                )

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, train={len(self.y_train)}, test={len(self.y_test)})"
        )

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_train, y_train)``: the form the curvature operators take as ``data``."""
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_test, y_test)``."""
        return self.x_test, self.y_test

    def train_val_split(
        self, val_fraction: float = 0.1, seed: int = 0
    ) -> tuple[Dataset, tuple[torch.Tensor, torch.Tensor]]:
        """Hold out a stratified ``val_fraction`` of the training set (see :func:`split_train_val`).

        Returns:
            ``(train, (x_val, y_val))`` where ``train`` is this data set with the held-out
            examples removed from its training part (the test part is unchanged).

        >>> ds = Dataset("toy", torch.zeros(10, 2), torch.arange(10) % 2,
        ...              torch.zeros(2, 2), torch.tensor([0, 1]), (2,), 2)
        >>> train, (x_val, y_val) = ds.train_val_split(0.2, seed=0)
        >>> len(train.y_train), sorted(y_val.tolist())
        (8, [0, 1])
        """
        x_tr, y_tr, x_val, y_val = split_train_val(
            self.x_train, self.y_train, val_fraction=val_fraction, seed=seed
        )
        return dataclasses.replace(self, x_train=x_tr, y_train=y_tr), (x_val, y_val)


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, targets)`` mini-batches of ``batch_size`` in a deterministic order.

    Without ``shuffle`` the order is the data's own; with it, a permutation drawn from ``seed``
    (pass a different seed each epoch for a new order). The last batch is smaller unless
    ``drop_last``.

    >>> x, y = torch.arange(5.0), torch.arange(5)
    >>> [b[1].tolist() for b in batches(x, y, batch_size=2)]
    [[0, 1], [2, 3], [4]]
    """
    check_xy(x, y, "batches")
    batch_size = check_positive_int(batch_size, "batch_size")
    n = len(y)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(check_seed(seed)))
        order = order.to(y.device)
    else:
        order = None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]
