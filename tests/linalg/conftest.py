"""Synthetic symmetric matrices with spectra like those of neural-network Hessians."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch

OUTLIERS = np.array([50.0, 31.0, 22.0, 15.0, 11.0, 8.5, 6.0, 4.5, 3.2, 2.4])


@cache
def _nn_like(dim: int, seed: int, n_neg: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    neg = -rng.uniform(0.05, 0.5, n_neg)
    bulk = rng.exponential(0.02, dim - OUTLIERS.size - n_neg)
    eigenvalues = np.concatenate([OUTLIERS, neg, bulk])
    if dim < 1000:  # a Haar-random orthogonal eigenbasis
        basis, r = np.linalg.qr(rng.standard_normal((dim, dim)))
        basis = basis * np.sign(np.diag(r))
        A = (basis * eigenvalues) @ basis.T
    else:  # cheaper: a product of Householder reflections (Lanczos and the trace
        # estimators with Gaussian or Rademacher probes do not see the basis's distribution)
        A = np.diag(eigenvalues)
        for _ in range(6):
            v = rng.standard_normal(dim)
            v /= np.linalg.norm(v)
            A = A - 2.0 * np.outer(v, v @ A)
            A = A - 2.0 * np.outer(A @ v, v)
    A = (A + A.T) / 2
    A.setflags(write=False)
    return A, np.sort(eigenvalues)


def nn_like(dim: int, seed: int = 0, n_neg: int = 5) -> tuple[torch.Tensor, np.ndarray]:
    """(A, eigenvalues ascending): 10 large positive outliers, a few negative values, and a
    bulk of small positive values, in a random orthogonal eigenbasis (float64)."""
    A, ev = _nn_like(dim, seed, n_neg)
    return torch.tensor(A), ev.copy()


@pytest.fixture
def make_nn_like():
    return nn_like


@cache
def _eigh(dim: int, seed: int, n_neg: int) -> tuple[np.ndarray, np.ndarray]:
    return np.linalg.eigh(_nn_like(dim, seed, n_neg)[0])


@pytest.fixture
def nn_like_eigh():
    """``f(dim, seed=0, n_neg=5) -> (eigenvalues, eigenvectors)`` of ``nn_like`` by eigh."""

    def f(dim: int, seed: int = 0, n_neg: int = 5) -> tuple[np.ndarray, np.ndarray]:
        ev, vecs = _eigh(dim, seed, n_neg)
        return ev.copy(), vecs.copy()

    return f
