"""Data sets that need no files: MNIST-1D (shipped arrays) and scikit-learn's handwritten digits.

Both return raw NumPy arrays; :func:`hesslens.zoo.datasets.load_dataset` turns them into a
:class:`~hesslens.zoo.dataset.Dataset`. The arrays are read once per process and cached
(read-only) in memory. MNIST-1D comes from ``mnist1d.npz`` in this folder, generated once by
the ``mnist1d`` package and verified by its SHA-256 on every load: generating it at run time
gave different data (and different results) under other numpy/scipy versions.
:func:`regenerate_mnist1d` checks the installed generator against the shipped arrays.

Example:
    >>> from hesslens.zoo.bundled import digits_arrays
    >>> x, y = digits_arrays()
    >>> x.shape, y.shape, int(x.max())
    ((1797, 1, 8, 8), (1797,), 16)
    >>> x_train, y_train, x_test, y_test = mnist1d_arrays()
    >>> x_train.shape, x_train.dtype, y_test.shape
    ((4000, 1, 40), dtype('float32'), (1000,))
"""

from __future__ import annotations

import functools
import io
import os
import random
from importlib import resources
from pathlib import Path

import numpy as np
import scipy

from hesslens.errors import HesslensInputError
from hesslens.files import write_bytes
from hesslens.provenance import sha256_arrays

MNIST1D_SHAPE = (1, 40)
DIGITS_SHAPE = (1, 8, 8)
DIGITS_SCALE = 16.0  # pixel values of load_digits are integers in [0, 16]


def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.setflags(write=False)
    return arrays


#: The MNIST-1D arrays shipped with the package (``x_train``, ``x_test`` float32 ``(N, 40)``;
#: ``y_train``, ``y_test`` uint8), generated once by :func:`generate_mnist1d_arrays`.
MNIST1D_FILE = "mnist1d.npz"
#: SHA-256 (:func:`hesslens.provenance.sha256_arrays`) of the four arrays as
#: :func:`mnist1d_arrays` returns them: float32 ``(N, 1, 40)`` signals, int64 labels.
MNIST1D_SHA256 = "c888b701758e326a25dd4a3a74f6ca2c7d2405a04f9c116f919a600ccfea349f"
MNIST1D_SIZES = {"train": 4000, "test": 1000}


def _mnist1d_hash(arrays: tuple[np.ndarray, ...]) -> str:
    return sha256_arrays(dict(zip(("x_train", "y_train", "x_test", "y_test"), arrays)))


def _mnist1d_path() -> Path:
    return Path(str(resources.files("hesslens.zoo").joinpath(MNIST1D_FILE)))


@functools.lru_cache(maxsize=1)
def mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The canonical MNIST-1D split: 4000 train / 1000 test signals of length 40.

    Read from the arrays shipped in the package (``hesslens/zoo/mnist1d.npz``, made once by
    :func:`generate_mnist1d_arrays`), so every machine gets the same data whatever its
    ``mnist1d``, numpy or scipy versions; their SHA-256 is checked against
    :data:`MNIST1D_SHA256` on loading.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: float32 ``(N, 1, 40)`` signals (centred and
        scaled as the ``mnist1d`` package makes them) and int64 labels in ``[0, 10)``.

    Raises:
        HesslensInputError: the shipped file is missing, unreadable or its arrays differ from
            the checksum (a damaged or edited installation: reinstall hesslens).
    """
    path = _mnist1d_path()
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = (
                np.ascontiguousarray(f["x_train"], dtype=np.float32).reshape(-1, *MNIST1D_SHAPE),
                np.asarray(f["y_train"], dtype=np.int64),
                np.ascontiguousarray(f["x_test"], dtype=np.float32).reshape(-1, *MNIST1D_SHAPE),
                np.asarray(f["y_test"], dtype=np.int64),
            )
    except (OSError, KeyError, ValueError) as error:
        raise HesslensInputError(
            f"cannot read the MNIST-1D arrays shipped with hesslens ({path}: "
            f"{type(error).__name__}: {error}); reinstall hesslens") from None
    digest = _mnist1d_hash(arrays)
    if digest != MNIST1D_SHA256:
        raise HesslensInputError(
            f"the MNIST-1D arrays in {path} have SHA-256 {digest[:16]}..., not the "
            f"{MNIST1D_SHA256[:16]}... this hesslens ships: the file is damaged or was "
            "replaced; reinstall hesslens")
    return _read_only(*arrays)  # type: ignore[return-value]


def generate_mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Generate MNIST-1D with the installed ``mnist1d`` package (its defaults, its own seed 42),
    offline, in the layout of :func:`mnist1d_arrays`. The result depends on the versions of
    ``mnist1d``, numpy and scipy, which is why the package ships the arrays instead.

    The package reseeds the global ``random`` and ``numpy.random`` states; they are restored.
    """
    from mnist1d.data import get_dataset_args, make_dataset  # here: mnist1d imports matplotlib

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

    def signals(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.float32).reshape(-1, *MNIST1D_SHAPE)

    return (signals(data["x"]), np.asarray(data["y"], dtype=np.int64),
            signals(data["x_test"]), np.asarray(data["y_test"], dtype=np.int64))


def regenerate_mnist1d(path: str | os.PathLike[str] | None = None,
                       check: bool = True) -> dict[str, object]:
    """Generate MNIST-1D with the installed generator and compare it with the shipped arrays.

    Args:
        path: where to write the arrays as a compressed ``.npz`` (the shipped file's layout),
            or ``None`` to write nothing.
        check: raise when the generated arrays' SHA-256 differs from :data:`MNIST1D_SHA256`
            (the installed ``mnist1d``/numpy/scipy make different data than the shipped one).

    Returns:
        ``{"sha256", "matches", "path"}``.

    Raises:
        HesslensInputError: ``check`` is set and the checksums differ (nothing is written).

    Shell: ``python benchmarks/make_mnist1d.py [OUT.npz] [--no-check]``.
    """
    arrays = generate_mnist1d_arrays()
    digest = _mnist1d_hash(arrays)
    matches = digest == MNIST1D_SHA256
    if check and not matches:
        import mnist1d  # here: it imports matplotlib

        raise HesslensInputError(
            f"the installed generator (mnist1d {getattr(mnist1d, '__version__', '?')}, numpy "
            f"{np.__version__}, scipy {scipy.__version__}) makes MNIST-1D arrays with SHA-256 "
            f"{digest[:16]}..., not the shipped {MNIST1D_SHA256[:16]}...; pass check=False "
            "(--no-check) to write them anyway")
    if path is not None:
        x_tr, y_tr, x_te, y_te = arrays
        buf = io.BytesIO()
        np.savez_compressed(buf, x_train=x_tr.reshape(len(x_tr), -1), y_train=y_tr.astype(np.uint8),
                            x_test=x_te.reshape(len(x_te), -1), y_test=y_te.astype(np.uint8))
        write_bytes(path, buf.getvalue())
    return {"sha256": digest, "matches": matches, "path": None if path is None else str(path)}


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 8x8 digit images bundled with scikit-learn, unsplit.

    Returns:
        ``(x, y)``: uint8 images ``(1797, 1, 8, 8)`` with values in ``[0, 16]`` and int64
        labels in ``[0, 10)``.
    """
    # scikit-learn on first use: importing it takes over a second of every start-up
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.uint8).reshape(-1, *DIGITS_SHAPE)
    return _read_only(x, np.asarray(bunch.target, dtype=np.int64))  # type: ignore[return-value]

