"""The data-set registry: what each data set is, and :func:`load_dataset` to get it.

Two data sets need nothing on disk: ``"mnist1d"`` (arrays made once by the ``mnist1d``
package, shipped with hesslens and checked by their SHA-256; the project's default) and
``"digits"`` (scikit-learn's bundled 8x8 digits). The others are read from standard files the
user already has (``root=``); see :mod:`hesslens.zoo.readers`. Nothing is ever downloaded.

Normalisation (``normalize=True``, the default): images are first scaled to ``[0, 1]``
(uint8 / 255; digits / 16), then every channel is standardised with the mean and standard
deviation of the *training* split, applied to both splits; the statistics are kept in
``Dataset.mean`` / ``Dataset.std``. With ``normalize=False`` images stay in ``[0, 1]`` and MNIST-1D
signals as the package makes them (already centred and scaled over the whole set).

Example:
    >>> from hesslens.zoo.datasets import dataset_info, load_dataset
    >>> dataset_info("cifar100").input_shape, dataset_info("cifar100").num_classes
    ((3, 32, 32), 100)
    >>> ds = load_dataset("digits", seed=0)
    >>> ds
    Dataset(name='digits', input_shape=(1, 8, 8), num_classes=10, train=1437, test=360)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from hesslens.checks import check_seed
from hesslens.errors import HesslensInputError
from hesslens.splits import split_train_val
from hesslens.zoo import readers
from hesslens.zoo.bundled import DIGITS_SCALE, digits_arrays, mnist1d_arrays
from hesslens.zoo.dataset import Dataset
from hesslens.zoo.tasks import TASKS, load_task

DIGITS_TEST_FRACTION = 0.2  # 1797 -> 1437 train / 360 test, stratified


@dataclass(frozen=True)
class DatasetInfo:
    """What a data set is, known without loading it.

    Attributes:
        name: registry name.
        input_shape: one example's shape, ``(C, L)`` or ``(C, H, W)``.
        num_classes: number of classes.
        files: the files read from ``root`` (empty for the built-in data sets).
        description: one line for help texts.

    >>> dataset_info("mnist1d").builtin
    True
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    files: tuple[str, ...]
    description: str

    @property
    def builtin(self) -> bool:
        """Whether the data set needs no files (and ignores ``root``)."""
        return not self.files


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "mnist1d", (1, 40), 10, (), "MNIST-1D: 4000/1000 signals of length 40, shipped"
        ),
        DatasetInfo("digits", (1, 8, 8), 10, (), "scikit-learn 8x8 digits, 1437/360 split"),
        DatasetInfo("mnist", (1, 28, 28), 10, readers.MNIST_FILES, "MNIST idx files"),
        DatasetInfo("fashionmnist", (1, 28, 28), 10, readers.MNIST_FILES, "FashionMNIST idx files"),
        DatasetInfo("svhn", (3, 32, 32), 10, readers.SVHN_FILES, "SVHN cropped digits .mat"),
        DatasetInfo(
            "cifar10",
            (3, 32, 32),
            10,
            tuple(f"cifar-10-batches-py/{f}" for f in readers.CIFAR10_FILES),
            "CIFAR-10 python batches",
        ),
        DatasetInfo(
            "cifar100",
            (3, 32, 32),
            100,
            tuple(f"cifar-100-python/{f}" for f in readers.CIFAR100_FILES),
            "CIFAR-100 python files, fine labels",
        ),
    )
}
DATASETS.update(  # token tasks for gpt-nano (hesslens.zoo.tasks): ids and labels (N, T)
    {n: DatasetInfo(n, t.input_shape, t.num_classes, (), t.description) for n, t in TASKS.items()}
)

_Root = str | os.PathLike[str] | None
# name -> (reader of raw (x_train, y_train, x_test, y_test), value that maps the raw data to [0, 1])
_READERS: dict[str, tuple[Callable[[_Root, int], readers.RawSplits], float]] = {
    "mnist1d": (lambda root, seed: mnist1d_arrays(), 1.0),
    "digits": (lambda root, seed: _digits_splits(seed), DIGITS_SCALE),
    "mnist": (lambda root, seed: readers.read_mnist(root, "mnist"), 255.0),
    "fashionmnist": (lambda root, seed: readers.read_mnist(root, "fashionmnist"), 255.0),
    "svhn": (lambda root, seed: readers.read_svhn(root), 255.0),
    "cifar10": (lambda root, seed: readers.read_cifar10(root), 255.0),
    "cifar100": (lambda root, seed: readers.read_cifar100(root), 255.0),
}


def _unknown(name: object) -> HesslensInputError:
    return HesslensInputError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (input shape, classes, files) without loading it.

    >>> dataset_info("mnist").files[0]
    'train-images-idx3-ubyte'
    """
    if name not in DATASETS:
        raise _unknown(name)
    return DATASETS[name]


def _digits_splits(seed: int) -> readers.RawSplits:
    x, y = digits_arrays()
    idx = torch.arange(len(y))
    train_idx, _, test_idx, _ = split_train_val(
        idx, torch.from_numpy(y.copy()), val_fraction=DIGITS_TEST_FRACTION, seed=seed
    )
    tr, te = train_idx.numpy(), test_idx.numpy()
    return x[tr], y[tr], x[te], y[te]


def _channel_stats(x: np.ndarray, scale: float, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of ``x / scale`` (channels on axis 1), in float64, by chunks."""
    axes = (0, *range(2, x.ndim))
    total = np.zeros(x.shape[1])
    total_sq = np.zeros(x.shape[1])
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].astype(np.float64) / scale
        total += part.sum(axis=axes)
        total_sq += np.square(part).sum(axis=axes)
    count = len(x) * int(np.prod(x.shape[2:]))
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean, np.where(std > 0, std, 1.0)


def _to_tensor(
    x: np.ndarray, scale: float, mean: np.ndarray | None, std: np.ndarray | None
) -> torch.Tensor:
    t = torch.from_numpy(np.array(x, dtype=np.float32))  # always a fresh, writable copy
    if scale != 1.0:
        t.div_(scale)
    if mean is not None and std is not None:
        view = (1, -1) + (1,) * (t.dim() - 2)
        t.sub_(torch.as_tensor(mean, dtype=torch.float32).view(view))
        t.div_(torch.as_tensor(std, dtype=torch.float32).view(view))
    return t


def load_dataset(name: str, root: _Root = None, seed: int = 0, normalize: bool = True) -> Dataset:
    """Load data set ``name`` into memory as a :class:`~hesslens.zoo.dataset.Dataset`.

    Args:
        name: one of :data:`DATASETS` (``"mnist1d"``, ``"digits"``, ``"mnist"``,
            ``"fashionmnist"``, ``"svhn"``, ``"cifar10"``, ``"cifar100"``).
        root: folder holding the files of a file-based data set (searched as described in
            :mod:`hesslens.zoo.readers`); ignored by ``"mnist1d"`` and ``"digits"``.
        seed: seeds the only random choice made here, the stratified train/test split of
            ``"digits"``. MNIST-1D is always the package's canonical split (its own seed 42) and
            the file data sets use their official splits.
        normalize: standardise each channel with training-set statistics (see the module
            docstring); ``False`` keeps inputs in ``[0, 1]`` (MNIST-1D: as shipped).

    Raises:
        HesslensInputError: unknown ``name`` (lists the known ones), no or a missing ``root``,
            missing or unreadable files (names the files and the folders searched).

    >>> ds = load_dataset("digits", normalize=False)
    >>> float(ds.x_train.min()), float(ds.x_train.max()), ds.y_train.dtype
    (0.0, 1.0, torch.int64)
    """
    if name not in DATASETS:
        raise _unknown(name)
    seed = check_seed(seed)
    if name in TASKS:  # a TokenDataset; seed draws its split, normalize does not apply
        return load_task(name, seed)
    info = DATASETS[name]
    reader, scale = _READERS[name]
    x_train, y_train, x_test, y_test = reader(root, seed)
    if tuple(x_train.shape[1:]) != info.input_shape or tuple(x_test.shape[1:]) != info.input_shape:
        raise HesslensInputError(
            f"{name}: the files hold examples of shape {tuple(x_train.shape[1:])} (train) and "
            f"{tuple(x_test.shape[1:])} (test); expected {info.input_shape}"
        )
    mean = std = None
    if normalize:
        mean, std = _channel_stats(x_train, scale)
    return Dataset(
        name=name,
        x_train=_to_tensor(x_train, scale, mean, std),
        y_train=torch.from_numpy(np.array(y_train, dtype=np.int64)),
        x_test=_to_tensor(x_test, scale, mean, std),
        y_test=torch.from_numpy(np.array(y_test, dtype=np.int64)),
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        mean=None if mean is None else tuple(float(m) for m in mean),
        std=None if std is None else tuple(float(s) for s in std),
    )
