"""eigsh warm starts (``v0=``) against cold starts on synthetic Hessian-like matrices.

Matrices of dim 400 with known eigenvectors (outliers 50, 31, 22, ... above an exponential
bulk), three seeds each. Prints the mean products of a cold and a warm start

* after a random symmetric perturbation of relative norm ``eps`` (the operator moved a little
  since the vectors were computed), for ``k`` = 1, 2, 3 (warm from ``k`` vectors for ``k = 1``,
  ``k + 1`` for ``k > 1``) and ``tol`` = 1e-6, 1e-3;
* from exact eigenvectors of the same matrix, with the random part of the start (relative size
  ``_WARM_RANDOM``) and without it;
* how often a warm start misses a new top eigenvalue whose eigenvector is nearly orthogonal to
  the start (one bulk eigenvalue raised above the top), for random parts of several sizes,
  beside a cold start.

Run: ``python benchmarks/bench_linalg_warm_start.py`` (about a minute on one CPU core).
"""

from __future__ import annotations

import argparse
import importlib
import warnings

import numpy as np
import torch

from hesslens.linalg import eigsh

lanczos_module = importlib.import_module("hesslens.linalg.lanczos")
OUTLIERS = [50.0, 31.0, 22.0, 15.0, 11.0, 8.5, 6.0, 4.5]


def _known(seed: int, n: int = 400, raise_at: int | None = None, to: float = 0.0):
    g = np.random.default_rng(seed)
    ev = np.concatenate([OUTLIERS, g.exponential(0.5, n - len(OUTLIERS))])
    if raise_at is not None:
        ev[raise_at] = to
    Q = np.linalg.qr(g.standard_normal((n, n)))[0]
    return torch.tensor((Q * ev) @ Q.T), torch.tensor(Q.T.copy())


def _perturbed(A: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
    E = torch.randn(A.shape, generator=torch.Generator().manual_seed(seed), dtype=A.dtype)
    E = (E + E.T) / 2
    return A + eps * E / torch.linalg.matrix_norm(E, 2) * torch.linalg.matrix_norm(A, 2)


def drift() -> None:
    print("perturbed by eps: mean products cold / warm")
    for k in (1, 2, 3):
        cells = []
        for eps in (1e-4, 1e-3, 1e-2):
            for tol in (1e-6, 1e-3):
                cold, warm = [], []
                for seed in range(3):
                    A, U = _known(seed)
                    A1 = _perturbed(A, eps, seed)
                    cold.append(eigsh(A1, k=k, tol=tol).n_hvp)
                    warm.append(eigsh(A1, k=k, tol=tol, v0=U[: k + (k > 1)]).n_hvp)
                cells.append(f"eps {eps:g} tol {tol:g}: {np.mean(cold):.1f} / {np.mean(warm):.1f}")
        print(f"  k={k}: " + "; ".join(cells))


def exact() -> None:
    print("exact eigenvectors of the same matrix: products cold / warm / warm without random part")
    A, U = _known(0)
    for k in (1, 2, 5):
        cold = eigsh(A, k=k).n_hvp
        warm = eigsh(A, k=k, v0=U[: k + (k > 1)]).n_hvp
        saved = lanczos_module._WARM_RANDOM
        lanczos_module._WARM_RANDOM = 0.0
        bare = eigsh(A, k=k, v0=U[: k + (k > 1)]).n_hvp
        lanczos_module._WARM_RANDOM = saved
        print(f"  k={k}: {cold} / {warm} / {bare}")


def new_top() -> None:
    print("a new top eigenvalue nearly orthogonal to v0 (k=1): missed / cases")
    saved = lanczos_module._WARM_RANDOM
    for mix in (0.0, 1e-3, 0.1, 1.0):
        lanczos_module._WARM_RANDOM = mix
        missed = cold_missed = cases = 0
        for seed in range(3):
            _, U = _known(seed)
            for idx in (30, 150, 390):
                for top in (52.0, 60.0, 80.0):
                    A2 = _perturbed(_known(seed, raise_at=idx, to=top)[0], 1e-3, idx)
                    ref = float(torch.linalg.eigvalsh(A2)[-1])
                    for tol in (1e-6, 1e-4, 1e-3):
                        for s in (0, 1):
                            cases += 1
                            off = max(10 * tol, 1e-5) * ref
                            w = float(eigsh(A2, k=1, tol=tol, seed=s, v0=U[0]).values[0])
                            c = float(eigsh(A2, k=1, tol=tol, seed=s).values[0])
                            missed += abs(w - ref) > off
                            cold_missed += abs(c - ref) > off
        print(f"  random part {mix:g}: warm {missed} / {cases}, cold {cold_missed} / {cases}")
    lanczos_module._WARM_RANDOM = saved


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    warnings.simplefilter("ignore")
    drift()
    exact()
    new_top()


if __name__ == "__main__":
    main()
