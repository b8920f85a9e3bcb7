"""Half-precision products against float64: how far rounding moves products and eigenvalues.

For small networks in bfloat16 and float16 (a tanh MLP, an attention block with LayerNorm, a
1-D CNN, a deep tanh MLP) and the float64 copy of the same weights, prints

* the product error on the top eigenvectors, ``||H_half v - H_64 v|| / (eps * scale)``
  (``scale`` = the largest |eigenvalue|): the basis of the noise ``2 eps scale`` that
  :mod:`hesslens.linalg.precision` assumes;
* ``H.eigenvalues(k=3)`` at the default tolerance and at ``tol=0.05``: the values, their
  relative errors against float64, and which are reported converged.

Run: ``python benchmarks/bench_linalg_precision.py`` (about a minute on one CPU core).
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from torch import nn
from torch.nn.functional import cross_entropy

import hesslens as hl


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.norm = nn.Linear(6, 12), nn.LayerNorm(12)
        self.att = nn.MultiheadAttention(12, 2, batch_first=True)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(x)).unsqueeze(1).repeat(1, 3, 1)
        return self.head(self.att(h, h, h)[0].mean(1))


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.head = nn.Conv1d(1, 4, 3), nn.Conv1d(4, 4, 3), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.c2(torch.tanh(self.c1(x.unsqueeze(1))))).flatten(1))


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    deep = [m for _ in range(6) for m in (nn.Linear(10, 10), nn.Tanh())]
    return {
        "tanh-mlp": nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)),
        "attention": _Attention(),
        "cnn": _CNN(),
        "deep-tanh": nn.Sequential(nn.Linear(6, 10), nn.Tanh(), *deep, nn.Linear(10, 4)),
    }


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=g) * 2, torch.randint(0, 4, (64,), generator=g)
    print(f"{'model':10} {'dtype':9} {'prod err':>9} {'tol':>6}  values (rel. error, converged)")
    for name, model in _models().items():
        for dtype in (torch.bfloat16, torch.float16):
            half = copy.deepcopy(model).to(dtype)
            dense = hl.Hessian(copy.deepcopy(half).double(), cross_entropy, (x, y)).dense()
            evals, evecs = torch.linalg.eigh(dense)
            eps, scale = torch.finfo(dtype).eps, float(evals.abs().max())
            H = hl.Hessian(half, cross_entropy, (x, y))
            top = evecs.T.flip(0)[:5]
            err = (H.hvp(top) - top @ dense).norm(dim=1) / (eps * scale)
            for tol in (1e-6, 0.05):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = H.eigenvalues(k=3, tol=tol)
                ref = evals.flip(0)[:3]
                rel = ((res.values - ref).abs() / ref.abs()).tolist()
                cells = ", ".join(f"{v:.4f} ({r:.1e}, {bool(c)})"
                                  for v, r, c in zip(res.values.tolist(), rel, res.converged))
                print(f"{name:10} {str(dtype)[6:]:9} {float(err.max()):9.3f} {tol:6g}  {cells}")


if __name__ == "__main__":
    main()
