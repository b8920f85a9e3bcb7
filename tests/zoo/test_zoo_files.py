"""Tests of the readers of on-disk data sets, on tiny files written in the real formats."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import scipy.io
import torch

from hesslens.errors import HesslensInputError
from hesslens.zoo import load_dataset
from hesslens.zoo.readers import MNIST_FILES, read_cifar_pickle, read_idx

RNG = np.random.default_rng(0)


def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    """Write ``array`` (uint8) as an idx file: magic 0x0000 08 ndim, big-endian dims, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def write_mnist(folder, n_train=12, n_test=5, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, gz=gz)
    return arrays


def test_idx_magic_numbers(tmp_path):
    write_mnist(tmp_path)
    assert (tmp_path / "train-images-idx3-ubyte").read_bytes()[:4] == (2051).to_bytes(4, "big")
    assert (tmp_path / "train-labels-idx1-ubyte").read_bytes()[:4] == (2049).to_bytes(4, "big")


@pytest.mark.parametrize(
    ("name", "layout", "gz"),
    [
        ("mnist", "MNIST/raw", False),
        ("mnist", "", True),
        ("fashionmnist", "FashionMNIST/raw", True),
        ("fashionmnist", "fashion-mnist", False),
    ],
)
def test_mnist_idx_files(tmp_path, name, layout, gz):
    arrays = write_mnist(tmp_path / layout if layout else tmp_path, gz=gz)
    ds = load_dataset(name, root=tmp_path, normalize=False)
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"][:, None] / 255.0).float()
    torch.testing.assert_close(ds.x_train, expected)
    assert ds.y_train.dtype == torch.int64
    assert ds.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_mnist_normalisation_uses_training_statistics(tmp_path):
    write_mnist(tmp_path)
    ds = load_dataset("mnist", root=str(tmp_path))
    raw = load_dataset("mnist", root=tmp_path, normalize=False)
    assert abs(float(ds.x_train.mean())) < 1e-5 and abs(float(ds.x_train.std()) - 1) < 1e-2
    torch.testing.assert_close(ds.mean[0], float(raw.x_train.double().mean()), rtol=1e-6, atol=0)
    torch.testing.assert_close(ds.x_test, (raw.x_test - ds.mean[0]) / ds.std[0])


def test_idx_dot_spelling_and_reader(tmp_path):
    arrays = write_mnist(tmp_path / "raw_files")
    for name in MNIST_FILES:  # Kaggle-style names: train-images.idx3-ubyte
        os.rename(tmp_path / "raw_files" / name, tmp_path / name.replace("-idx", ".idx"))
    ds = load_dataset("mnist", root=tmp_path, normalize=False)
    assert ds.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert read_idx(tmp_path / "t10k-images.idx3-ubyte").shape == (5, 28, 28)


def test_bad_idx_files(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x89PNG....")
    with pytest.raises(HesslensInputError, match="not an idx file"):
        load_dataset("mnist", root=tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((12, 28, 28), np.uint8))
    data = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(data[:-10])
    with pytest.raises(HesslensInputError, match="truncated or corrupt"):
        load_dataset("mnist", root=tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((11, 28, 28), np.uint8))
    with pytest.raises(HesslensInputError, match="11 images but 12 labels"):
        load_dataset("mnist", root=tmp_path)


def test_svhn_mat_files(tmp_path):
    folder = tmp_path / "svhn"
    folder.mkdir()
    x_train = RNG.integers(0, 256, (32, 32, 3, 7), dtype=np.uint8)
    y_train = np.array([[10], [1], [2], [3], [10], [9], [5]], dtype=np.uint8)
    x_test = RNG.integers(0, 256, (32, 32, 3, 3), dtype=np.uint8)
    scipy.io.savemat(folder / "train_32x32.mat", {"X": x_train, "y": y_train})
    scipy.io.savemat(folder / "test_32x32.mat", {"X": x_test, "y": np.array([[4], [10], [7]])})
    ds = load_dataset("svhn", root=tmp_path, normalize=False)
    assert ds.x_train.shape == (7, 3, 32, 32) and ds.input_shape == (3, 32, 32)
    assert ds.y_train.tolist() == [0, 1, 2, 3, 0, 9, 5] and ds.y_test.tolist() == [4, 0, 7]
    assert float(ds.x_train[4, 2, 5, 17]) == pytest.approx(x_train[5, 17, 2, 4] / 255.0)
    normed = load_dataset("svhn", root=tmp_path)
    per_channel = normed.x_train.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(1, correction=0), torch.ones(3), atol=1e-4, rtol=0)
    assert len(normed.mean) == 3


def write_cifar(path, images: np.ndarray, labels: list[int], label_key: bytes, protocol: int):
    batch = {b"batch_label": b"tiny", b"data": images.reshape(len(images), -1), label_key: labels}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [lab // 5 for lab in labels]
    path.write_bytes(pickle.dumps(batch, protocol=protocol))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_batches(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train = []
    for i in range(1, 6):
        images = RNG.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
        write_cifar(folder / f"data_batch_{i}", images, [i, (i * 7) % 10], b"labels", protocol)
        train.append(images)
    test_images = RNG.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    write_cifar(folder / "test_batch", test_images, [9, 0, 4], b"labels", protocol)
    ds = load_dataset("cifar10", root=tmp_path, normalize=False)
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.num_classes == 10
    assert ds.y_train.tolist() == [1, 7, 2, 4, 3, 1, 4, 8, 5, 5]
    assert ds.y_test.tolist() == [9, 0, 4]
    expected = torch.from_numpy(np.concatenate(train) / 255.0).float()
    torch.testing.assert_close(ds.x_train, expected)
    # the folder itself may be given as root
    assert torch.equal(load_dataset("cifar10", root=folder, normalize=False).x_test, ds.x_test)


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_cifar(
        folder / "train",
        RNG.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8),
        [0, 99, 57, 3],
        b"fine_labels",
        4,
    )
    write_cifar(
        folder / "test",
        RNG.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8),
        [12, 98],
        b"fine_labels",
        4,
    )
    ds = load_dataset("cifar100", root=tmp_path)
    assert ds.num_classes == 100 and ds.input_shape == (3, 32, 32)
    assert ds.y_train.tolist() == [0, 99, 57, 3] and ds.y_test.tolist() == [12, 98]
    assert ds.x_train.dtype == torch.float32 and len(ds.std) == 3


def test_cifar_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(HesslensInputError, match=r"refusing to load (posix|nt)\.getcwd"):
        read_cifar_pickle(tmp_path / "test_batch")


def test_cifar_wrong_keys(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test"):  # CIFAR-10-style keys where CIFAR-100 keys are expected
        write_cifar(folder / name, np.zeros((1, 3, 32, 32), np.uint8), [0], b"labels", 4)
    with pytest.raises(HesslensInputError, match="'fine_labels'"):
        load_dataset("cifar100", root=tmp_path)


@pytest.mark.parametrize(
    ("name", "files"),
    [
        ("mnist", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
        ("fashionmnist", ["train-labels-idx1-ubyte"]),
        ("svhn", ["train_32x32.mat", "test_32x32.mat"]),
        ("cifar10", ["data_batch_1", "data_batch_5", "test_batch"]),
        ("cifar100", ["train", "test"]),
    ],
)
def test_missing_files_name_what_is_expected_and_where(tmp_path, name, files):
    with pytest.raises(HesslensInputError) as no_root:
        load_dataset(name)
    assert "root" in str(no_root.value) and all(f in str(no_root.value) for f in files)
    with pytest.raises(HesslensInputError, match="does not exist"):
        load_dataset(name, root=tmp_path / "nowhere")
    with pytest.raises(HesslensInputError) as empty:
        load_dataset(name, root=tmp_path)
    message = str(empty.value)
    assert all(f in message for f in files)
    assert str(tmp_path) in message and "never downloads" in message


def test_partial_files_are_reported(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw")
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(HesslensInputError, match="lacks t10k-labels-idx1-ubyte"):
        load_dataset("mnist", root=tmp_path)
