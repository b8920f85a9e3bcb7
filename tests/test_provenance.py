"""Data fingerprints, versions and the bit-exactness record (hesslens.provenance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hesslens.provenance import bit_exactness, data_fingerprint, sha256_arrays, versions

A = np.arange(12, dtype=np.float32).reshape(3, 4)


def test_numpy_and_torch_hash_alike_whatever_the_layout_or_byte_order():
    base = sha256_arrays({"x": A})
    assert sha256_arrays({"x": torch.from_numpy(A.copy())}) == base
    assert sha256_arrays({"x": np.asfortranarray(A)}) == base  # same values, other layout
    assert sha256_arrays({"x": A.astype(">f4")}) == base  # big-endian bytes, same values
    t = torch.from_numpy(A.T.copy()).T  # a non-contiguous tensor view
    assert sha256_arrays({"x": t}) == base


@pytest.mark.parametrize("other", [
    {"x": A.astype(np.float64)},                      # dtype
    {"x": A.reshape(4, 3)},                           # shape
    {"y": A},                                         # name
    {"x": np.where(A == 5, np.float32(5.000001), A)},  # one value
    {"x": A, "y": np.zeros(0)},                       # one more array
])
def test_any_change_changes_the_hash(other):
    assert sha256_arrays(other) != sha256_arrays({"x": A})


def test_fingerprint_names_sizes_and_hash():
    fp = data_fingerprint("toy", {"x": A, "y": torch.tensor([0, 1, 2])})
    assert fp == {"name": "toy", "sizes": {"x": [3, 4], "y": [3]},
                  "sha256": sha256_arrays({"x": A, "y": np.array([0, 1, 2])})}


def test_bit_exactness_follows_torch_settings():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert bit_exactness()["threads"] == threads + 1
    finally:
        torch.set_num_threads(threads)
    assert bit_exactness("cpu") == {
        "threads": threads, "torch": torch.__version__, "device_type": "cpu",
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


def test_versions_name_the_software_and_device():
    v = versions()
    assert v["torch"] == torch.__version__ and v["numpy"] == np.__version__
    assert v["device"] == "cpu" and {"hesslens", "python", "scipy", "platform"} <= set(v)
