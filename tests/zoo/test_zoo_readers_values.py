"""The file readers refuse values a cast to uint8 / int64 would change, naming them."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import scipy.io

from hesslens.errors import HesslensInputError
from hesslens.zoo import load_dataset

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">f4"): 0x0D}


def _idx(path, array: np.ndarray) -> None:
    code = IDX_CODES[array.dtype]
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array).tobytes())


def _mnist(folder, images=None, labels=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    good_x = np.arange(4 * 28 * 28, dtype=np.uint8).reshape(4, 28, 28)
    good_y = np.array([0, 1, 2, 9], dtype=np.uint8)
    _idx(folder / "train-images-idx3-ubyte", good_x if images is None else images)
    _idx(folder / "train-labels-idx1-ubyte", good_y if labels is None else labels)
    _idx(folder / "t10k-images-idx3-ubyte", good_x[:2])
    _idx(folder / "t10k-labels-idx1-ubyte", good_y[:2])


def _floats(fill: dict[tuple[int, int, int], float]) -> np.ndarray:
    x = np.arange(4 * 28 * 28).reshape(4, 28, 28) % 256
    x = x.astype(">f4")
    for where, value in fill.items():
        x[where] = value
    return x


@pytest.mark.parametrize(
    ("fill", "message"),
    [
        ({(0, 3, 3): float("nan"), (2, 0, 0): float("inf")}, r"2 pixel values are NaN or infinite"),
        ({(1, 5, 5): 300.0}, r"1 pixel values lie outside \[0, 255\] \(e\.g\. 300\.0"),
        ({(1, 5, 5): -1.0}, r"outside \[0, 255\]"),
        ({(3, 1, 2): 0.5}, r"not whole numbers \(e\.g\. 0\.5\).*raw 0\.\.255"),
    ],
)
def test_float_idx_images_outside_the_pixel_range_are_refused(tmp_path, fill, message):
    _mnist(tmp_path, images=_floats(fill))
    with pytest.raises(HesslensInputError, match=message):
        load_dataset("mnist", root=tmp_path)


def test_float_idx_images_of_whole_pixel_values_are_read_exactly(tmp_path):
    _mnist(tmp_path, images=_floats({(0, 0, 0): 255.0}))
    ds = load_dataset("mnist", root=tmp_path, normalize=False)
    expected = (np.arange(4 * 28 * 28).reshape(4, 1, 28, 28) % 256).astype(np.float32) / 255
    expected[0, 0, 0, 0] = 1.0
    np.testing.assert_array_equal(ds.x_train.numpy(), expected)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([0, 1, -2, 3], dtype=np.int8), r"1 labels lie outside \[0, 9\] \(e\.g\. -2"),
        (np.array([0, 1, 2, 10], dtype=np.uint8), r"outside \[0, 9\]"),
        (np.array([0, 1.5, 2, 3], dtype=">f4"), r"labels are not whole numbers \(e\.g\. 1\.5"),
    ],
)
def test_idx_labels_outside_the_classes_are_refused(tmp_path, labels, message):
    _mnist(tmp_path, labels=labels)
    with pytest.raises(HesslensInputError, match=message):
        load_dataset("mnist", root=tmp_path)


def _svhn(folder, y_train, x_train=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n = len(y_train)
    x = np.full((32, 32, 3, n), 7, dtype=np.uint8) if x_train is None else x_train
    scipy.io.savemat(folder / "train_32x32.mat", {"X": x, "y": np.asarray(y_train).reshape(-1, 1)})
    scipy.io.savemat(folder / "test_32x32.mat",
                     {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[10], [1]])})


@pytest.mark.parametrize("bad", [-3, 0, 11, 17])
def test_svhn_labels_outside_1_to_10_are_refused_not_wrapped(tmp_path, bad):
    _svhn(tmp_path, np.array([1, bad, 10], dtype=np.int16))
    with pytest.raises(HesslensInputError, match=rf"1 labels lie outside \[1, 10\] \(e\.g\. {bad}"):
        load_dataset("svhn", root=tmp_path)


def test_svhn_label_10_is_the_digit_0(tmp_path):
    _svhn(tmp_path, np.array([10, 1, 9, 10], dtype=np.float64))  # .mat files often hold doubles
    ds = load_dataset("svhn", root=tmp_path, normalize=False)
    assert ds.y_train.tolist() == [0, 1, 9, 0] and ds.y_test.tolist() == [0, 1]


def test_svhn_float_images_with_nan_are_refused(tmp_path):
    x = np.full((32, 32, 3, 2), 3.0)
    x[4, 4, 1, 1] = np.nan
    _svhn(tmp_path, np.array([1, 2]), x_train=x)
    with pytest.raises(HesslensInputError, match=r"train_32x32\.mat: 1 pixel values are NaN"):
        load_dataset("svhn", root=tmp_path)


def _cifar10(folder, labels, data=None) -> None:
    folder = folder / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    images = np.zeros((len(labels), 3072), np.uint8) if data is None else data
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {b"data": images, b"labels": labels}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


@pytest.mark.parametrize("labels", [["cat", "dog"], ["3", "4"]])
def test_cifar_string_labels_are_refused_by_name(tmp_path, labels):
    _cifar10(tmp_path, labels)
    with pytest.raises(HesslensInputError, match=r"data_batch_1: labels are strings .*'"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_labels_that_are_not_numbers_are_refused(tmp_path):
    _cifar10(tmp_path, [0, None])
    with pytest.raises(HesslensInputError, match=r"labels have dtype object .*not numbers"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_float_data_out_of_range_is_refused(tmp_path):
    data = np.zeros((2, 3072))
    data[1, 100] = 256.0
    _cifar10(tmp_path, [0, 1], data=data)
    with pytest.raises(HesslensInputError, match=r"pixel values lie outside \[0, 255\]"):
        load_dataset("cifar10", root=tmp_path)
