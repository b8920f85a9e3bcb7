"""Top-3 Hessian eigenvalues of a tiny Hugging Face GPT-2 in float32 from finite-difference and
exact products, against the dense float64 Hessian, on uneven batches.

The zoo's gpt-nano (26,368 parameters, its own loss, the default attention) on the first
``sum(--split)`` sequences of its modular-addition analysis set, cut into uneven mapping batches
(default 3 and 2 sequences). The reference is the dense float64 Hessian of the model's own loss
over all of them at once (the mean over their label tokens), built column by column with
``torch.func`` (``jvp`` of ``grad``, forward-over-reverse, vmapped over chunks of basis vectors,
under the math attention kernel), symmetrised, and its top eigenvalues by
``scipy.sparse.linalg.eigsh(tol=0)``. Every method then runs in float32 on the batches:

* hesslens ``H.eigenvalues(k=3)``, exact (the engine's path) and ``path="fd"``;
* hessian-eigenthings 1.0 ``lanczos(HessianOperator(model, batches, hf_lm_loss(),
  method="finite_difference"), k=3)`` with its defaults (``max_iter=2k``, ``which="LM"``: the
  largest in magnitude, here 76.3, -68.8, 54.0), then with ``which="LA"`` (the largest, what
  hesslens returns), then with ``max_iter=50`` too (the most steps it reorthogonalises by
  default; without that, 60 steps give ghost copies of the top value), on the uneven batches
  and on one batch of all sequences (its fd error alone: one batch has no weighting to get
  wrong); its exact operator (``method="autograd"``) the same way on the uneven batches, on
  the default attention (it fails: that error is a row) and under
  ``sdpa_kernel(SDPBackend.MATH)`` (its equal weighting of the batches alone). ``seed=0``
  everywhere for a reproducible start.

Each row: the values, the relative error of each against the reference's (the largest for
``which="LA"`` and hesslens, the largest in magnitude for ``which="LM"``) and the largest of
them, the products (counted by us), the batch gradients one fd product costs, the seconds, and
the relative error of one product of a unit vector against the dense matrix's. Run with the
peers' environment (``benchmarks/README.md``)::

    /tmp/benchvenv/bin/python benchmarks/bench_fd_eigen.py          # -> results/fd_eigen.json
    /tmp/benchvenv/bin/python benchmarks/bench_fd_eigen.py --split 3 2 --chunk 128

About 6 GB of memory for the dense float64 Hessian.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from _measure import write_results
from _peers import attention
from bench_core import describe
from bench_transformers import _setup

K = 3


def dense_hessian(model, batch: dict, chunk: int) -> torch.Tensor:
    """The float64 Hessian of ``model(**batch).loss`` in the parameters, by vmapped
    forward-over-reverse products with the basis vectors, symmetrised."""
    from torch.func import functional_call, grad, jvp, vmap

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    dim = sum(sizes)

    def loss(flat):
        parts = dict(zip(names, (c.reshape(s) for c, s in zip(flat.split(sizes), shapes))))
        return functional_call(model, parts, args=(), kwargs=batch).loss

    flat0 = torch.cat([params[n].reshape(-1) for n in names])
    column = vmap(lambda e: jvp(grad(loss), (flat0,), (e,))[1])
    H = torch.empty(dim, dim, dtype=torch.float64)
    with attention(True):
        for start in range(0, dim, chunk):
            stop = min(dim, start + chunk)
            E = torch.zeros(stop - start, dim, dtype=torch.float64)
            E[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            H[start:stop] = column(E)
    # Symmetrise in blocks (a transposed copy would double the 5.6 GB).
    norm, diff2, block = float(H.norm()), 0.0, 2048
    for s in range(0, dim, block):
        for t in range(s, dim, block):
            a, b = H[s:s + block, t:t + block], H[t:t + block, s:s + block]
            d = a - b.T
            diff2 += (1 if s == t else 2) * float((d * d).sum())
            mean = 0.5 * (a + b.T)
            a.copy_(mean)
            b.copy_(mean.T)
    dense_hessian.asymmetry = diff2 ** 0.5 / norm
    return H


def _top(H: torch.Tensor, which: str) -> list[float]:
    from scipy.sparse.linalg import eigsh

    vals = eigsh(H.numpy(), k=K, which=which, tol=0, return_eigenvectors=False)
    key = (lambda x: -abs(x)) if which == "LM" else (lambda x: -x)
    return sorted((float(x) for x in vals), key=key)


def _errors(values: list[float], ref: list[float]) -> list[float]:
    return [abs(a - b) / abs(b) for a, b in zip(values, ref)]


def _hesslens(model, batches, path: str) -> dict:
    import hesslens as hl

    H = hl.Hessian(model, None, batches, path=path)
    res = H.eigenvalues(k=K)
    products = int(H.n_products) + int(H.path_choice.calibration_products)
    return {"values": [float(x) for x in res.values], "products": products,
            "gradients_per_product": 4 * len(batches) if path == "fd" else None,
            "converged": bool(res.converged.all()), "path": H.engine_choice.get("single"),
            "product": H.hvp}


def _eigenthings(model, batches, method: str, max_iter: int | None, math: bool,
                 which: str = "LM") -> dict:
    import hessian_eigenthings as he

    op = he.HessianOperator(model, batches, he.hf_lm_loss(), method=method)
    calls = [0]
    orig = op.matvec

    def counted(v):
        calls[0] += 1
        with attention(math):
            return orig(v)

    op.matvec = counted
    res = he.lanczos(op, k=K, max_iter=max_iter, seed=0, which=which)
    key = (lambda x: -abs(x)) if which == "LM" else (lambda x: -x)
    values = sorted((float(x) for x in res.eigenvalues), key=key)
    return {"values": values, "products": calls[0],
            "gradients_per_product": 2 * len(batches) if method != "autograd" else None,
            "converged": bool(res.converged.all()), "iterations": int(res.iterations),
            "product": counted}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", nargs="+", type=int, default=[3, 2])
    parser.add_argument("--chunk", type=int, default=256, help="basis vectors per vmap call")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "fd_eigen.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start, t_start = os.getloadavg(), time.time()
    split = tuple(args.split)
    model64, _, whole64 = _setup("gpt-nano", torch.float64, split=(sum(split),))
    t0 = time.perf_counter()
    H = dense_hessian(model64, whole64[0], args.chunk)
    ref = {"LA": _top(H, "LA"), "LM": _top(H, "LM")}
    reference = {"top_largest": ref["LA"], "top_magnitude": ref["LM"],
                 "asymmetry_before_symmetrising": dense_hessian.asymmetry,
                 "dim": H.shape[0], "seconds": time.perf_counter() - t0}
    print(f"reference ({H.shape[0]} dims, {reference['seconds']:.0f} s): largest {ref['LA']}, "
          f"largest magnitude {ref['LM']}", flush=True)
    v64 = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64)
    v64 /= v64.norm()
    Hv = H @ v64
    del H

    model, _, batches = _setup("gpt-nano", torch.float32, split=split)
    _, _, whole = _setup("gpt-nano", torch.float32, split=(sum(split),))
    cases = [
        ("hesslens exact", "LA", lambda: _hesslens(model, batches, "auto")),
        ("hesslens fd", "LA", lambda: _hesslens(model, batches, "fd")),
        ("hessian-eigenthings fd, defaults", "LM",
         lambda: _eigenthings(model, batches, "finite_difference", None, False)),
        ("hessian-eigenthings fd, which=LA", "LA",
         lambda: _eigenthings(model, batches, "finite_difference", None, False, "LA")),
        ("hessian-eigenthings fd, LA, max_iter=50", "LA",
         lambda: _eigenthings(model, batches, "finite_difference", 50, False, "LA")),
        ("hessian-eigenthings fd, LA, max_iter=50, one batch", "LA",
         lambda: _eigenthings(model, whole, "finite_difference", 50, False, "LA")),
        ("hessian-eigenthings exact, LA, max_iter=50", "LA",
         lambda: _eigenthings(model, batches, "autograd", 50, False, "LA")),
        ("hessian-eigenthings exact +math, LA, max_iter=50", "LA",
         lambda: _eigenthings(model, batches, "autograd", 50, True, "LA")),
    ]
    rows = []
    print(f"\n{'method':<52} {'max rel err':>11} {'products':>8} {'seconds':>8} "
          f"{'Hv err':>8}  values")
    for label, which, run in cases:
        row: dict = {"method": label, "batches": [len(b["labels"]) for b in
                                                  (whole if "one batch" in label else batches)]}
        try:
            t0 = time.perf_counter()
            out = run()
            row["seconds"] = time.perf_counter() - t0
            product = out.pop("product")
            row.update(out)
            row["rel_errors"] = _errors(row["values"], ref[which])
            row["max_rel_error"] = max(row["rel_errors"])
            row["compared_with"] = "top_largest" if which == "LA" else "top_magnitude"
            hv = product(v64.float()).double()
            row["product_rel_error"] = float((hv - Hv).norm() / Hv.norm())
            print(f"{label:<52} {row['max_rel_error']:11.1e} {row['products']:>8} "
                  f"{row['seconds']:8.2f} {row['product_rel_error']:8.1e}  "
                  f"{[round(x, 5) for x in row['values']]}", flush=True)
        except Exception as err:
            row["error"] = describe(err)
            print(f"{label:<52} error: {row['error'][:120]}", flush=True)
        rows.append(row)
    write_results(args.out, {
        "benchmark": "fd_eigen", "model": "gpt-nano", "dtype": "float32", "split": split,
        "threads": args.threads, "load_average_start": load_start,
        "load_average_end": os.getloadavg(), "wall_seconds": time.time() - t_start,
        "command": "python benchmarks/bench_fd_eigen.py " + " ".join(argv or sys.argv[1:]),
        "reference": reference, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
