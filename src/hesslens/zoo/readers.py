"""Readers for standard data-set files that a user already has on disk (never downloads).

* MNIST / FashionMNIST: the four idx files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, plain or
  gzipped (``.gz``); the ``name.idx3-ubyte`` spelling is accepted too.
* SVHN: ``train_32x32.mat`` and ``test_32x32.mat`` (the "cropped digits" format; labels are
  1..10 and label 10 means digit 0). ``extra_32x32.mat`` is not read.
* CIFAR-10: ``cifar-10-batches-py/data_batch_1`` ... ``data_batch_5`` and ``test_batch``.
* CIFAR-100: ``cifar-100-python/train`` and ``test`` (fine labels, 100 classes).

The CIFAR files are Python pickles. They are read with an unpickler that only rebuilds NumPy
arrays, so a tampered file cannot run code.

Each ``read_*`` function takes the user's ``root`` folder, looks for the files in a few usual
places under it (listed in :data:`SEARCH_DIRS`), and returns raw arrays
``(x_train, y_train, x_test, y_test)``: uint8 images ``(N, C, H, W)`` and int64 labels.
Values are checked, never cast silently: pixel values must be whole numbers in ``[0, 255]``
(float files too: NaN, fractions and out-of-range values are refused), labels integers in
``[0, num_classes)`` (strings by name). Missing files raise
:class:`~hesslens.errors.HesslensInputError` naming the files expected and every folder
searched.

Example:
    >>> import tempfile
    >>> from hesslens.errors import HesslensInputError
    >>> try:
    ...     read_cifar10(tempfile.mkdtemp())
    ... except HesslensInputError as error:
    ...     print(str(error).split(",")[0])
    cifar10: could not find data_batch_1
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
from pathlib import Path

import numpy as np
from scipy.io import loadmat

from hesslens.errors import HesslensInputError

RawSplits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")
CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
CIFAR100_FILES = ("train", "test")

#: Sub-folders of ``root`` searched, in order ("" is ``root`` itself).
SEARCH_DIRS: dict[str, tuple[str, ...]] = {
    "mnist": ("MNIST/raw", "mnist/raw", "MNIST", "mnist", ""),
    "fashionmnist": (
        "FashionMNIST/raw",
        "fashionmnist/raw",
        "fashion-mnist/raw",
        "fashion_mnist/raw",
        "FashionMNIST",
        "fashionmnist",
        "fashion-mnist",
        "fashion_mnist",
        "",
    ),
    "svhn": ("SVHN", "svhn", ""),
    "cifar10": (
        "cifar-10-batches-py",
        "cifar10/cifar-10-batches-py",
        "CIFAR10/cifar-10-batches-py",
        "",
    ),
    "cifar100": (
        "cifar-100-python",
        "cifar100/cifar-100-python",
        "CIFAR100/cifar-100-python",
        "",
    ),
}

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _variants(name: str, gz: bool) -> list[str]:
    names = [name, name.replace("-idx", ".idx")] if "-idx" in name else [name]
    return [v for n in dict.fromkeys(names) for v in ((n, n + ".gz") if gz else (n,))]


def find_files(
    dataset: str, root: str | os.PathLike[str] | None, files: tuple[str, ...], gz: bool = False
) -> dict[str, Path]:
    """Find the folder under ``root`` that holds all of ``files``; map each name to its path.

    With ``gz=True`` a file may also be gzipped (``name.gz``). The folders tried are
    ``SEARCH_DIRS[dataset]`` under ``root``, in order; the first that holds every file wins.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "train").write_bytes(b""), (d / "test").write_bytes(b"")
    >>> sorted(find_files("cifar100", d, CIFAR100_FILES))
    ['test', 'train']
    """
    listing = ", ".join(files)
    suffix = " (each may also end in .gz)" if gz else ""
    if root is None:
        raise HesslensInputError(
            f"{dataset}: this data set is read from files on disk, and no root folder was given; "
            f"give the folder (--data-root DIR on the command line, root=DIR in Python) "
            f"where DIR holds {listing}"
            f"{suffix}. hesslens never downloads data"
        )
    base = Path(root).expanduser()
    if not base.is_dir():
        raise HesslensInputError(
            f"{dataset}: the root folder {str(base)!r} does not exist or is not a folder; "
            f"pass the folder that holds {listing}{suffix}"
        )
    searched: list[str] = []
    partial: list[str] = []
    for sub in SEARCH_DIRS[dataset]:
        folder = base / sub if sub else base
        searched.append(str(folder))
        found = {}
        for name in files:
            hit = next((folder / v for v in _variants(name, gz) if (folder / v).is_file()), None)
            if hit is not None:
                found[name] = hit
        if len(found) == len(files):
            return found
        if found:
            missing = ", ".join(n for n in files if n not in found)
            partial.append(f"{folder} has {', '.join(found)} but lacks {missing}")
    detail = f" ({'; '.join(partial)})" if partial else ""
    raise HesslensInputError(
        f"{dataset}: could not find {listing}{suffix}; looked in {', '.join(searched)}{detail}. "
        "Put the files in one of these folders; hesslens never downloads data"
    )


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one idx file (the MNIST format), plain or gzipped, into a NumPy array.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "labels-idx1-ubyte"
    >>> _ = p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
    >>> read_idx(p).tolist()
    [7, 8, 9]
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise HesslensInputError(f"cannot read the idx file {path}: {error}") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise HesslensInputError(
            f"{path} is not an idx file (bad magic number {data[:4].hex() or 'none'}); "
            "expected the MNIST-format files, e.g. 00000803 for images and 00000801 for labels"
        )
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise HesslensInputError(f"{path}: idx header is truncated")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = math.prod(dims)
    if len(data) - header != count * dtype.itemsize:
        raise HesslensInputError(
            f"{path}: idx header announces shape {dims} ({count * dtype.itemsize} bytes) but the "
            f"file holds {len(data) - header} bytes of data; the file is truncated or corrupt"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


def _examples(values: np.ndarray, bad: np.ndarray, limit: int = 3) -> str:
    flat = values.reshape(-1)[bad.reshape(-1)][:limit]
    return ", ".join(repr(v.item() if hasattr(v, "item") else v) for v in flat)


def _whole_numbers(a: np.ndarray, what: str, where: str, lo: int, hi: int) -> np.ndarray:
    """``a`` as int64 if it holds whole numbers in ``[lo, hi]``; otherwise an error naming the
    dtype or the offending values (NaN, fractions, out of range) -- never a silent cast."""
    kind = a.dtype.kind
    if kind in "US":
        raise HesslensInputError(
            f"{where}: {what} are strings (dtype {a.dtype}), e.g. "
            f"{_examples(a, np.ones(a.shape, bool))}; expected integers in [{lo}, {hi}]")
    if kind not in "iuf":
        raise HesslensInputError(
            f"{where}: {what} have dtype {a.dtype} "
            f"({'booleans' if kind == 'b' else 'not numbers'}); expected integers in [{lo}, {hi}]")
    if a.size == 0:
        return a.astype(np.int64)
    if kind == "f":
        bad = ~np.isfinite(a)
        if bad.any():
            raise HesslensInputError(
                f"{where}: {int(bad.sum())} {what} are NaN or infinite (e.g. {_examples(a, bad)}); "
                f"expected integers in [{lo}, {hi}]")
        bad = a != np.round(a)
        if bad.any():
            raise HesslensInputError(
                f"{where}: {int(bad.sum())} {what} are not whole numbers (e.g. "
                f"{_examples(a, bad)}); expected integers in [{lo}, {hi}]"
                + (" (images scaled to [0, 1]? give the raw 0..255 values)"
                   if what == "pixel values" else ""))
    bad = (a < lo) | (a > hi)
    if bad.any():
        raise HesslensInputError(
            f"{where}: {int(bad.sum())} {what} lie outside [{lo}, {hi}] (e.g. {_examples(a, bad)}, "
            f"range {a.min().item()}..{a.max().item()})")
    return a.astype(np.int64)


def _check_split(
    x: np.ndarray, y: np.ndarray, where: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 and labels as int64, refusing (by name) anything a cast would change:
    pixel values that are not whole numbers in [0, 255] (NaN, fractions, out of range),
    labels that are not integers in [0, num_classes) (strings, fractions, negatives)."""
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise HesslensInputError(f"{where}: {len(x)} images but {len(y)} labels")
    y = _whole_numbers(y, "labels", where, 0, num_classes - 1)
    if x.dtype != np.uint8:
        _whole_numbers(x, "pixel values", where, 0, 255)
    return np.ascontiguousarray(x, dtype=np.uint8), y


def read_mnist(root: str | os.PathLike[str] | None, name: str = "mnist") -> RawSplits:
    """Read MNIST (``name="mnist"``) or FashionMNIST (``name="fashionmnist"``) idx files.

    Returns uint8 images ``(N, 1, 28, 28)`` and int64 labels for the train and test splits.
    """
    if name not in ("mnist", "fashionmnist"):
        raise HesslensInputError(f"read_mnist reads 'mnist' or 'fashionmnist', not {name!r}")
    paths = find_files(name, root, MNIST_FILES, gz=True)
    out: list[np.ndarray] = []
    for split in ("train", "t10k"):
        images = read_idx(paths[f"{split}-images-idx3-ubyte"])
        labels = read_idx(paths[f"{split}-labels-idx1-ubyte"])
        where = f"{name} {paths[f'{split}-images-idx3-ubyte'].parent}"
        if images.ndim != 3 or labels.ndim != 1:
            raise HesslensInputError(
                f"{where}: expected images (N, H, W) and labels (N,), "
                f"got {images.shape} and {labels.shape}; are the file names swapped?"
            )
        out += _check_split(images[:, None], labels, where, 10)
    return out[0], out[1], out[2], out[3]


def read_svhn(root: str | os.PathLike[str] | None) -> RawSplits:
    """Read SVHN's ``train_32x32.mat`` and ``test_32x32.mat``; label 10 becomes 0.

    Returns uint8 images ``(N, 3, 32, 32)`` and int64 labels in ``[0, 10)``.
    """
    paths = find_files("svhn", root, SVHN_FILES)
    out: list[np.ndarray] = []
    for name in SVHN_FILES:
        try:
            mat = loadmat(paths[name])
        except Exception as error:  # scipy raises several types for a bad file
            raise HesslensInputError(
                f"cannot read {paths[name]} as a .mat file: {error}"
            ) from error
        if "X" not in mat or "y" not in mat or np.ndim(mat["X"]) != 4:
            raise HesslensInputError(
                f"{paths[name]}: expected the SVHN variables X (32, 32, 3, N) and y (N, 1)"
            )
        x = np.transpose(mat["X"], (3, 2, 0, 1))
        # SVHN's labels are 1..10, where 10 stands for the digit 0; anything else is refused
        y = _whole_numbers(np.asarray(mat["y"]).reshape(-1), "labels", str(paths[name]), 1, 10)
        out += _check_split(x, np.where(y == 10, 0, y), str(paths[name]), 10)
    return out[0], out[1], out[2], out[3]


_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds plain data and NumPy arrays and refuses anything else."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar_pickle(path: str | os.PathLike[str]) -> dict[str, object]:
    """Load one CIFAR "python version" pickle as a dict with ``str`` keys.

    Works for the original Python 2 files and for Python 3 re-pickles (bytes or str keys).
    """
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as error:
        raise HesslensInputError(f"cannot read {path} as a CIFAR pickle: {error}") from error
    if not isinstance(obj, dict):
        raise HesslensInputError(f"{path}: expected a dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _cifar_arrays(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = read_cifar_pickle(path)
    if "data" not in batch or label_key not in batch:
        raise HesslensInputError(
            f"{path}: expected the keys 'data' and {label_key!r}, found {sorted(batch)}"
        )
    data = np.asarray(batch["data"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise HesslensInputError(f"{path}: 'data' must have shape (N, 3072), got {data.shape}")
    return _check_split(
        data.reshape(-1, 3, 32, 32), np.asarray(batch[label_key]), str(path), num_classes
    )


def read_cifar10(root: str | os.PathLike[str] | None) -> RawSplits:
    """Read the CIFAR-10 python batches: 5 training batches and ``test_batch``.

    Returns uint8 images ``(N, 3, 32, 32)`` and int64 labels in ``[0, 10)``.
    """
    paths = find_files("cifar10", root, CIFAR10_FILES)
    train = [_cifar_arrays(paths[f"data_batch_{i}"], "labels", 10) for i in range(1, 6)]
    x_test, y_test = _cifar_arrays(paths["test_batch"], "labels", 10)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return x_train, y_train, x_test, y_test


def read_cifar100(root: str | os.PathLike[str] | None) -> RawSplits:
    """Read the CIFAR-100 python files ``train`` and ``test`` with their 100 fine labels.

    Returns uint8 images ``(N, 3, 32, 32)`` and int64 labels in ``[0, 100)``.
    """
    paths = find_files("cifar100", root, CIFAR100_FILES)
    x_train, y_train = _cifar_arrays(paths["train"], "fine_labels", 100)
    x_test, y_test = _cifar_arrays(paths["test"], "fine_labels", 100)
    return x_train, y_train, x_test, y_test
