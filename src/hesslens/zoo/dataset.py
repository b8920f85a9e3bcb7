"""The :class:`Dataset` container and the seeded ways to cut data into pieces.

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

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from hesslens.errors import HesslensInputError
from hesslens.zoo._checks import check_int, check_positive_int


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


def check_labels(y: torch.Tensor, what: str = "data") -> None:
    """Raise unless ``y`` is a 1-D integer tensor of class indices.

    >>> check_labels(torch.tensor([0, 2, 1]))
    """
    if not isinstance(y, torch.Tensor):
        raise HesslensInputError(f"{what}: labels must be a torch tensor, got {type(y).__name__}")
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise HesslensInputError(
            f"{what}: labels must be a 1-D integer tensor of class indices, "
            f"got shape {tuple(y.shape)} and dtype {y.dtype}"
        )


def check_xy(x: torch.Tensor, y: torch.Tensor, what: str = "data") -> None:
    """Raise unless ``x`` is a tensor with one row per label of the 1-D integer tensor ``y``.

    >>> check_xy(torch.zeros(3, 2), torch.tensor([0, 1, 1]))
    """
    if not isinstance(x, torch.Tensor):
        raise HesslensInputError(f"{what}: inputs must be a torch tensor, got {type(x).__name__}")
    check_labels(y, what)
    if x.dim() == 0 or x.shape[0] != y.shape[0]:
        raise HesslensInputError(
            f"{what}: inputs have {x.shape[0] if x.dim() else 0} rows but there are "
            f"{y.shape[0]} labels; give one label per example"
        )


def split_train_val(
    x: torch.Tensor, y: torch.Tensor, val_fraction: float = 0.1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``(x, y)`` into a training and a validation part, stratified by class.

    The validation part has ``ceil(val_fraction * N)`` examples (scikit-learn's rounding) drawn
    with ``seed``; each class keeps its share. When stratifying is impossible (a class with a
    single example, or fewer validation slots than classes) the split is a plain seeded random
    one. Both parts keep the original order of the examples.

    Returns:
        ``(x_train, y_train, x_val, y_val)``.

    >>> x, y = torch.arange(20.0), torch.arange(20) % 2
    >>> x_tr, y_tr, x_val, y_val = split_train_val(x, y, val_fraction=0.2, seed=0)
    >>> len(x_tr), len(x_val), torch.bincount(y_val).tolist()
    (16, 4, [2, 2])
    """
    check_xy(x, y, "split_train_val")
    seed = check_int(seed, "seed")
    n = len(y)
    if n < 2:
        raise HesslensInputError(f"split_train_val needs at least 2 examples, got {n}")
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise HesslensInputError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    n_val = int(np.ceil(val_fraction * n))
    if n_val >= n:
        raise HesslensInputError(
            f"val_fraction={val_fraction} of {n} examples leaves no training examples; "
            "use a smaller fraction or more data"
        )
    labels = y.cpu().numpy()
    counts = np.bincount(labels - labels.min())
    present = counts[counts > 0]
    can_stratify = present.min() >= 2 and min(n_val, n - n_val) >= present.size
    train_idx, val_idx = train_test_split(
        np.arange(n),
        test_size=n_val,
        random_state=seed,
        stratify=labels if can_stratify else None,
    )
    train_idx = torch.as_tensor(np.sort(train_idx), device=y.device)
    val_idx = torch.as_tensor(np.sort(val_idx), device=y.device)
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx]


def subset_indices(y: torch.Tensor, per_class: int = 10, seed: int = 0) -> torch.Tensor:
    """Indices of ``per_class`` seeded-random examples of every class present in ``y``.

    A class with fewer than ``per_class`` examples contributes all it has; a class absent from
    ``y`` contributes nothing. The indices come back sorted (the data's own order).

    >>> subset_indices(torch.tensor([0, 0, 0, 1, 2, 2]), per_class=2, seed=0).tolist()
    [0, 2, 3, 4, 5]
    """
    check_labels(y, "subset_indices")
    per_class = check_positive_int(per_class, "per_class")
    generator = torch.Generator().manual_seed(check_int(seed, "seed"))
    order = torch.randperm(len(y), generator=generator)
    labels = y.cpu()[order]
    chosen = [order[labels == c][:per_class] for c in torch.unique(labels)]
    if not chosen:
        return torch.zeros(0, dtype=torch.long, device=y.device)
    return torch.sort(torch.cat(chosen)).values.to(y.device)


def analysis_subset(
    x: torch.Tensor, y: torch.Tensor, per_class: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed small set the Hessian is measured on: ``per_class`` examples of each class.

    The paper used 10 training examples per class with seed 0. Classes with fewer examples
    give all they have (so the result may hold fewer than ``per_class * num_classes``).
    Deterministic in ``seed``; see :func:`subset_indices`.

    >>> x, y = torch.randn(50, 2), torch.arange(50) % 10
    >>> xs, ys = analysis_subset(x, y, per_class=3, seed=1)
    >>> xs.shape, torch.bincount(ys).tolist() == [3] * 10
    (torch.Size([30, 2]), True)
    """
    check_xy(x, y, "analysis_subset")
    idx = subset_indices(y, per_class=per_class, seed=seed)
    return x[idx], y[idx]


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
        order = torch.randperm(n, generator=torch.Generator().manual_seed(check_int(seed, "seed")))
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
