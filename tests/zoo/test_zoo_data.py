"""Tests of the built-in data sets (MNIST-1D, digits) and the seeded split/subset helpers."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from hesslens.errors import HesslensInputError
from hesslens.zoo import (
    DATASETS,
    Dataset,
    analysis_subset,
    batches,
    dataset_info,
    load_dataset,
    split_train_val,
    subset_indices,
)
from hesslens.zoo.bundled import mnist1d_arrays


@pytest.fixture(scope="module")
def mnist1d(tmp_path_factory):
    """Build MNIST-1D once, from an empty working folder, with the global RNGs seeded."""
    folder = tmp_path_factory.mktemp("cwd")
    here = os.getcwd()
    random.seed(11)
    np.random.seed(11)
    before = (random.random(), np.random.rand())
    random.seed(11)
    np.random.seed(11)
    mnist1d_arrays.cache_clear()
    os.chdir(folder)
    try:
        ds = load_dataset("mnist1d")
    finally:
        os.chdir(here)
    after = (random.random(), np.random.rand())
    return ds, before, after, sorted(os.listdir(folder))


def test_mnist1d_shapes_and_classes(mnist1d):
    ds = mnist1d[0]
    assert ds.x_train.shape == (4000, 1, 40) and ds.x_test.shape == (1000, 1, 40)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.input_shape == (1, 40) == dataset_info("mnist1d").input_shape
    assert ds.num_classes == 10
    assert sorted(ds.y_train.unique().tolist()) == list(range(10))
    assert abs(float(ds.x_train.mean())) < 1e-4 and abs(float(ds.x_train.std()) - 1) < 1e-3


def test_mnist1d_offline_deterministic_and_leaves_global_state(mnist1d):
    ds, before, after, written = mnist1d
    assert written == []  # nothing downloaded or pickled into the working folder
    assert before == after  # the package's reseeding of random / numpy.random is undone
    again = load_dataset("mnist1d")
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)
    again.x_train.add_(1.0)  # a caller's in-place edit must not reach the cache
    assert torch.equal(load_dataset("mnist1d").x_train, ds.x_train)


def test_mnist1d_unnormalised_is_the_package_data(mnist1d):
    raw = load_dataset("mnist1d", normalize=False)
    x_train, _y_train, _, _ = mnist1d_arrays()
    assert torch.equal(raw.x_train, torch.from_numpy(x_train.copy()))
    assert torch.equal(raw.y_train, mnist1d[0].y_train)
    assert raw.mean is None and raw.std is None


def test_digits_split_and_scaling():
    ds = load_dataset("digits", seed=0)
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    counts = torch.bincount(ds.y_test, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # stratified: ~36 per class
    assert abs(float(ds.x_train.mean())) < 1e-5 and abs(float(ds.x_train.std()) - 1) < 1e-3
    raw = load_dataset("digits", seed=0, normalize=False)
    assert float(raw.x_train.min()) == 0.0 and float(raw.x_train.max()) == 1.0
    mean, std = ds.mean[0], ds.std[0]
    torch.testing.assert_close(ds.x_test, (raw.x_test - mean) / std)


def test_digits_seed_controls_split():
    a, b, c = (
        load_dataset("digits", seed=0),
        load_dataset("digits", seed=0),
        load_dataset("digits", seed=1),
    )
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_test, c.y_test)


def test_registry_and_info():
    assert list(DATASETS) == [
        "mnist1d",
        "digits",
        "mnist",
        "fashionmnist",
        "svhn",
        "cifar10",
        "cifar100",
        "modadd",  # token tasks, tested in test_zoo_transformers.py
        "seqcopy",
    ]
    assert dataset_info("cifar10").num_classes == 10
    assert dataset_info("cifar100").num_classes == 100
    assert dataset_info("svhn").input_shape == (3, 32, 32)
    assert dataset_info("fashionmnist").input_shape == (1, 28, 28)
    assert dataset_info("digits").builtin and not dataset_info("mnist").builtin
    for call in (lambda: dataset_info("imagenet"), lambda: load_dataset("imagenet")):
        with pytest.raises(HesslensInputError, match="mnist1d, digits, mnist"):
            call()
    with pytest.raises(HesslensInputError, match="seed"):
        load_dataset("digits", seed="0")


def _labels(n_per_class: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])


def test_analysis_subset_k_per_class_deterministic_and_seeded():
    y = _labels([30] * 10)[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    x = torch.arange(300.0).unsqueeze(1) * torch.ones(1, 3)
    xs, ys = analysis_subset(x, y, per_class=10, seed=0)
    assert torch.bincount(ys).tolist() == [10] * 10
    idx = xs[:, 0].long()
    assert torch.equal(y[idx], ys)  # rows and labels stay paired
    assert torch.equal(idx, idx.sort().values)  # kept in the data's order
    xs2, ys2 = analysis_subset(x, y, per_class=10, seed=0)
    assert torch.equal(xs, xs2) and torch.equal(ys, ys2)
    xs3, _ = analysis_subset(x, y, per_class=10, seed=1)
    assert not torch.equal(xs, xs3)


def test_analysis_subset_small_and_missing_classes():
    y = _labels([5, 2, 0, 7])
    idx = subset_indices(y, per_class=3, seed=0)
    assert torch.bincount(y[idx]).tolist() == [3, 2, 0, 3]
    assert len(subset_indices(torch.zeros(0, dtype=torch.long), 3)) == 0
    with pytest.raises(HesslensInputError, match="per_class"):
        subset_indices(y, per_class=0)
    with pytest.raises(HesslensInputError, match="integer"):
        analysis_subset(torch.zeros(4, 2), torch.zeros(4), per_class=1)
    with pytest.raises(HesslensInputError, match="one label per example"):
        analysis_subset(torch.zeros(5, 2), torch.zeros(4, dtype=torch.long))


def test_split_train_val_stratified_disjoint_and_deterministic():
    y = _labels([40, 20, 40])
    x = torch.arange(100.0)
    x_tr, _y_tr, x_val, y_val = split_train_val(x, y, val_fraction=0.1, seed=0)
    assert len(x_val) == 10 and len(x_tr) == 90
    assert torch.bincount(y_val).tolist() == [4, 2, 4]
    assert sorted(torch.cat([x_tr, x_val]).tolist()) == x.tolist()
    assert torch.equal(y[x_val.long()], y_val)
    again = split_train_val(x, y, val_fraction=0.1, seed=0)
    assert torch.equal(again[2], x_val)
    assert not torch.equal(split_train_val(x, y, val_fraction=0.1, seed=1)[2], x_val)


def test_split_train_val_falls_back_without_stratification_and_checks_fraction():
    y = torch.tensor([0, 0, 0, 1, 2, 2])  # class 1 has one example: cannot stratify
    _, _, x_val, _ = split_train_val(torch.arange(6.0), y, val_fraction=0.5, seed=0)
    assert len(x_val) == 3
    for bad in (0.0, 1.0, -0.1, "0.1"):
        with pytest.raises(HesslensInputError, match="val_fraction"):
            split_train_val(torch.arange(6.0), y, val_fraction=bad)
    with pytest.raises(HesslensInputError, match="no training examples"):
        split_train_val(torch.arange(2.0), torch.tensor([0, 1]), val_fraction=0.9)


def test_dataset_train_val_split_and_validation():
    ds = Dataset(
        "toy",
        torch.zeros(20, 2),
        torch.arange(20) % 2,
        torch.ones(4, 2),
        torch.arange(4) % 2,
        (2,),
        2,
    )
    train, (_x_val, y_val) = ds.train_val_split(val_fraction=0.25, seed=3)
    assert len(train.y_train) == 15 and len(y_val) == 5
    assert torch.equal(train.x_test, ds.x_test) and train.name == "toy"
    assert repr(ds) == "Dataset(name='toy', input_shape=(2,), num_classes=2, train=20, test=4)"
    assert ds.train[0] is ds.x_train and ds.test[1] is ds.y_test
    with pytest.raises(HesslensInputError, match="input_shape"):
        Dataset(
            "bad",
            torch.zeros(3, 2),
            torch.zeros(3, dtype=torch.long),
            torch.zeros(1, 2),
            torch.zeros(1, dtype=torch.long),
            (3,),
            2,
        )


def test_batches_order_shuffle_and_drop_last():
    x, y = torch.arange(10.0), torch.arange(10)
    plain = list(batches(x, y, batch_size=4))
    assert [len(b[1]) for b in plain] == [4, 4, 2]
    assert torch.equal(torch.cat([b[0] for b in plain]), x)
    shuffled = [b[1] for b in batches(x, y, 4, shuffle=True, seed=0)]
    assert [t.tolist() for t in shuffled] == [
        t.tolist() for t in (b[1] for b in batches(x, y, 4, shuffle=True, seed=0))
    ]
    assert sorted(torch.cat(shuffled).tolist()) == list(range(10))
    assert not torch.equal(torch.cat(shuffled), y)
    assert all(torch.equal(bx.long(), by) for bx, by in batches(x, y, 4, shuffle=True, seed=2))
    assert [len(b[1]) for b in batches(x, y, 4, drop_last=True)] == [4, 4]
    with pytest.raises(HesslensInputError, match="batch_size"):
        list(batches(x, y, 0))


def test_dataset_rejects_out_of_range_labels_and_tiny_splits():
    with pytest.raises(HesslensInputError, match="outside"):
        Dataset(
            "bad",
            torch.zeros(2, 1),
            torch.tensor([0, 2]),
            torch.zeros(1, 1),
            torch.tensor([0]),
            (1,),
            2,
        )
    with pytest.raises(HesslensInputError, match="at least 2 examples"):
        split_train_val(torch.zeros(1, 2), torch.tensor([0]))
