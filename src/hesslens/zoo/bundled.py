"""Data sets that need no files: MNIST-1D (generated) and scikit-learn's handwritten digits.

Both return raw NumPy arrays; :func:`hesslens.zoo.datasets.load_dataset` turns them into a
:class:`~hesslens.zoo.dataset.Dataset`. The arrays are built once per process and cached
(read-only) in memory.

Example:
    >>> from hesslens.zoo.bundled import digits_arrays
    >>> x, y = digits_arrays()
    >>> x.shape, y.shape, int(x.max())
    ((1797, 1, 8, 8), (1797,), 16)
"""

from __future__ import annotations

import functools
import random

import numpy as np

MNIST1D_SHAPE = (1, 40)
DIGITS_SHAPE = (1, 8, 8)
DIGITS_SCALE = 16.0  # pixel values of load_digits are integers in [0, 16]


def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.setflags(write=False)
    return arrays


@functools.lru_cache(maxsize=1)
def mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Build the canonical MNIST-1D split offline: 4000 train / 1000 test signals of length 40.

    Calls ``mnist1d.data.make_dataset(get_dataset_args())`` (the package's defaults, its own
    seed 42), which generates the data locally and never downloads. The package reseeds the
    global ``random`` and ``numpy.random`` states; they are restored afterwards. Takes about
    5 s the first time, nothing after.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: float32 ``(N, 1, 40)`` signals (already
        centred and scaled by the package) and int64 labels in ``[0, 10)``.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

    def signals(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.float32).reshape(-1, *MNIST1D_SHAPE)

    return _read_only(  # type: ignore[return-value]
        signals(data["x"]),
        np.asarray(data["y"], dtype=np.int64),
        signals(data["x_test"]),
        np.asarray(data["y_test"], dtype=np.int64),
    )


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 8x8 digit images bundled with scikit-learn, unsplit.

    Returns:
        ``(x, y)``: uint8 images ``(1797, 1, 8, 8)`` with values in ``[0, 16]`` and int64
        labels in ``[0, 10)``.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.uint8).reshape(-1, *DIGITS_SHAPE)
    return _read_only(x, np.asarray(bunch.target, dtype=np.int64))  # type: ignore[return-value]
