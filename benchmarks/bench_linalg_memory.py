"""Peak memory of the linalg estimators on a ~10M-dimensional operator.

Each estimator runs in a fresh subprocess (so that one's peak does not hide another's) on a
cheap symmetric operator, a diagonal plus a rank-4 part, ``A = diag(d) + B^T diag(c) B``,
in float32 with ``dim`` entries. On the CPU the peak is the rise of the process's peak
resident set (``VmHWM`` in ``/proc/self/status``; tracemalloc does not see torch's
allocations) over its resident set once the operator is built; on a GPU it is
``torch.cuda.max_memory_allocated`` over what the operator holds. Both are given in bytes and
in float32 copies of the parameters (``4 * dim`` bytes), the unit of the target (at most ~40
copies for top-5, the default trace and the density). One product of this operator needs
about ``2 * batch * dim`` entries of its own, which the numbers include.

Usage::

    python benchmarks/bench_linalg_memory.py                 # dim 10M, CPU
    python benchmarks/bench_linalg_memory.py --dim 1000000 --device cuda

prints a table and writes ``benchmarks/results/linalg_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ESTIMATORS = {
    "eigsh(k=5)": "eigsh",
    "trace (block_traces, defaults)": "trace",
    "slq (defaults)": "slq",
    "density (eigsh k=10 tol=1e-4, slq deflated)": "density",
}


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(name: str, dim: int, device: str) -> dict:
    import torch

    import hesslens.linalg as hla

    torch.manual_seed(0)
    dev = torch.device(device)

    class DiagPlusLowRank:
        """``A = diag(d) + B^T diag(c) B`` with ``B`` of shape (4, dim)."""

        def __init__(self) -> None:
            g = torch.Generator().manual_seed(0)
            self.dim, self.dtype, self.device = dim, torch.float32, dev
            self.d = (torch.rand(dim, generator=g) * 0.01).to(dev)
            B = torch.randn(4, dim, generator=g)
            self.B = (B / B.norm(dim=1, keepdim=True)).to(dev)
            self.c = torch.tensor([50.0, 30.0, 20.0, 10.0], device=dev)

        def matmat(self, V: torch.Tensor) -> torch.Tensor:
            return V * self.d + ((V @ self.B.T) * self.c) @ self.B

    op = DiagPlusLowRank()
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _vm("VmRSS")
    t0 = time.perf_counter()
    info: dict = {}
    if name == "eigsh":
        r = hla.eigsh(op, k=5)
        info = {"n_hvp": r.n_hvp, "converged": bool(r.converged.all()),
                "values": [round(float(v), 6) for v in r.values]}
    elif name == "trace":
        full, _ = hla.block_traces(op)
        info = {"n_hvp": full.n_hvp, "value": full.value, "stderr": full.stderr,
                "exact": float(op.d.sum() + op.c.sum())}
    elif name == "slq":
        spec, n_hvp = hla.slq(op)
        info = {"n_hvp": n_hvp, "mean": spec.mean, "exact_mean": float(op.d.mean() + op.c.sum()
                                                                       / dim)}
    elif name == "density":
        top = hla.eigsh(op, k=10, tol=1e-4)
        spec, n_hvp = hla.slq(op, deflate=top)
        info = {"n_hvp": top.n_hvp + n_hvp, "mean": spec.mean,
                "exact_mean": float(op.d.mean() + op.c.sum() / dim)}
    seconds = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _vm("VmHWM") - base
    return {"peak_bytes": int(peak), "copies": peak / (4 * dim), "seconds": seconds, **info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=10_000_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=sorted(ESTIMATORS.values()), action="append")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "linalg_memory.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.dim, args.device)))
        return

    rows = {}
    for label, name in ESTIMATORS.items():
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, __file__, "--child", name, "--dim", str(args.dim),
               "--device", args.device]
        # glibc returns freed blocks above its mmap threshold to the system at once; a fixed
        # threshold keeps freed vectors from lingering in the heap and inflating the peak RSS
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if out.returncode != 0:
            rows[label] = {"error": out.stderr.strip().splitlines()[-1:]}
            print(f"{label:48s} failed: {out.stderr.strip()[-300:]}")
            continue
        rows[label] = json.loads(out.stdout.strip().splitlines()[-1])
        r = rows[label]
        print(f"{label:48s} peak {r['peak_bytes'] / 2**20:9.1f} MiB = {r['copies']:5.1f} "
              f"float32 copies   n_hvp {r['n_hvp']:5d}   {r['seconds']:7.1f} s")
    out_path = Path(args.out)
    if args.only and out_path.exists():  # a partial rerun updates its rows of the same setup
        old = json.loads(out_path.read_text())
        if (old.get("dim"), old.get("device")) == (args.dim, args.device):
            rows = {**old.get("estimators", {}), **rows}
    result = {"dim": args.dim, "device": args.device, "dtype": "float32",
              "python": platform.python_version(), "machine": platform.machine(),
              "estimators": rows}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
