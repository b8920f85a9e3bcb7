"""The MNIST-1D arrays are shipped with the package and verified by their SHA-256."""

from __future__ import annotations

import numpy as np
import pytest

from hesslens.errors import HesslensInputError
from hesslens.provenance import sha256_arrays
from hesslens.zoo import bundled


def _shipped() -> dict[str, np.ndarray]:
    with np.load(bundled._mnist1d_path(), allow_pickle=False) as f:
        return {k: f[k].copy() for k in f.files}


def test_shipped_file_is_small_and_holds_float32_signals_and_uint8_labels():
    path = bundled._mnist1d_path()
    assert path.is_file() and path.stat().st_size < 1_000_000
    arrays = _shipped()
    assert sorted(arrays) == ["x_test", "x_train", "y_test", "y_train"]
    assert arrays["x_train"].dtype == np.float32 and arrays["x_train"].shape == (4000, 40)
    assert arrays["y_test"].dtype == np.uint8 and arrays["y_test"].shape == (1000,)


def test_loaded_arrays_hash_to_the_published_checksum():
    x_tr, y_tr, x_te, y_te = bundled.mnist1d_arrays()
    digest = sha256_arrays({"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te})
    assert digest == bundled.MNIST1D_SHA256
    assert (len(y_tr), len(y_te)) == (bundled.MNIST1D_SIZES["train"], bundled.MNIST1D_SIZES["test"])


def test_a_changed_value_in_the_shipped_file_is_refused(tmp_path, monkeypatch):
    arrays = _shipped()
    arrays["x_test"][3, 7] = np.nextafter(arrays["x_test"][3, 7], np.float32(np.inf))  # one ulp
    bad = tmp_path / "mnist1d.npz"
    np.savez_compressed(bad, **arrays)
    monkeypatch.setattr(bundled, "_mnist1d_path", lambda: bad)
    bundled.mnist1d_arrays.cache_clear()
    try:
        with pytest.raises(HesslensInputError, match=r"SHA-256.*reinstall"):
            bundled.mnist1d_arrays()
        bad.write_bytes(b"not a zip file")
        with pytest.raises(HesslensInputError, match="cannot read the MNIST-1D arrays"):
            bundled.mnist1d_arrays()
    finally:
        bundled.mnist1d_arrays.cache_clear()


def _fake_generator(monkeypatch, shift: float) -> None:
    x_tr, y_tr, x_te, y_te = (a.copy() for a in bundled.mnist1d_arrays())
    x_tr[0, 0, 0] += shift
    monkeypatch.setattr(bundled, "generate_mnist1d_arrays", lambda: (x_tr, y_tr, x_te, y_te))


def test_regenerate_writes_a_file_that_loads_to_the_same_arrays(tmp_path, monkeypatch):
    _fake_generator(monkeypatch, 0.0)  # a generator that makes the shipped data
    out = tmp_path / "again.npz"
    info = bundled.regenerate_mnist1d(out)
    assert info["matches"] and info["sha256"] == bundled.MNIST1D_SHA256
    written = np.load(out)
    shipped = _shipped()
    for k in shipped:
        assert written[k].dtype == shipped[k].dtype and np.array_equal(written[k], shipped[k])


def test_regenerate_refuses_a_generator_that_makes_other_data(tmp_path, monkeypatch):
    _fake_generator(monkeypatch, 1e-3)
    out = tmp_path / "other.npz"
    with pytest.raises(HesslensInputError, match=r"installed generator .* SHA-256"):
        bundled.regenerate_mnist1d(out)
    assert not out.exists()
    info = bundled.regenerate_mnist1d(out, check=False)
    assert not info["matches"] and out.is_file()
