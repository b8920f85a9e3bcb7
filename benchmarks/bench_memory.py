"""Peak memory of the operators' estimators on a ~10M-parameter network, in float32 copies of
its parameters above the peak of one gradient.

Each measurement runs in a fresh subprocess (one estimator's peak must not hide another's): the
process builds the model and data, records its resident set, then runs one thing and reports
the rise of its peak resident set (``VmHWM``; on a GPU ``torch.cuda.max_memory_allocated``).
"gradient" is one ``loss.backward()`` of the same model and batch, the reference the target is
stated against (top-5, trace and density at defaults within 40 float32 parameter copies above
one gradient). The operator's own snapshot of the parameters (one copy) is counted in every
estimator's peak.

Usage::

    python benchmarks/bench_memory.py                       # 9.6M-parameter MLP, CPU
    python benchmarks/bench_memory.py --width 1024 --device cuda

prints a table and writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _measure import vm, write_results

CASES = ("gradient", "hessian-construction", "eigenvalues(k=5)", "trace()", "density()")


def _child(case: str, width: int, depth: int, samples: int, device: str) -> dict:
    import torch

    import hesslens as hl

    torch.manual_seed(0)
    dev = torch.device(device)
    layers: list[torch.nn.Module] = [torch.nn.Linear(784, width), torch.nn.Tanh()]
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    layers.append(torch.nn.Linear(width, 10))
    model = torch.nn.Sequential(*layers).to(dev)
    x = torch.randn(samples, 784, device=dev)
    y = torch.randint(0, 10, (samples,), device=dev)
    n = sum(p.numel() for p in model.parameters())
    loss_fn = torch.nn.functional.cross_entropy

    def peak() -> int:
        if dev.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return vm("VmHWM")

    base = torch.cuda.memory_allocated() if dev.type == "cuda" else vm("VmRSS")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    extra: dict = {}
    if case == "gradient":
        loss_fn(model(x), y).backward()
    else:
        H = hl.Hessian(model, loss_fn, (x, y))
        if case == "eigenvalues(k=5)":
            r = H.eigenvalues(k=5)
            extra = {"n_hvp": r.n_hvp, "converged": bool(r.converged.all()),
                     "top": [float(v) for v in r.values]}
        elif case == "trace()":
            r = H.trace()
            extra = {"n_hvp": r.n_hvp, "value": r.value, "stderr": r.stderr}
        elif case == "density()":
            s = H.density()
            extra = {"n_hvp": H.n_products, "nodes": len(s.nodes)}
    seconds = time.perf_counter() - t0
    return {"case": case, "n_params": n, "bytes": peak() - base, "seconds": seconds, **extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=3, help="hidden layers")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.width, args.depth, args.samples,
                                args.device)))
        return 0
    rows = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "--child", case, "--width", str(args.width),
               "--depth", str(args.depth), "--samples", str(args.samples),
               "--device", args.device]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            rows.append({"case": case, "error": done.stderr.strip().splitlines()[-1:]})
            print(f"  {case}: error {rows[-1]['error']}", flush=True)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  measured {case}: {rows[-1]['bytes'] / 2**20:.0f} MB", flush=True)
    grad = next((r["bytes"] for r in rows if r.get("case") == "gradient"), 0)
    print(f"{'case':<22} {'peak MB':>9} {'above grad (f32 copies)':>24} {'products':>9} "
          f"{'seconds':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<22} error: {r['error']}")
            continue
        copies = (r["bytes"] - grad) / (4 * r["n_params"])
        r["copies_above_gradient"] = copies
        print(f"{r['case']:<22} {r['bytes'] / 2**20:9.0f} {copies:24.1f} "
              f"{r.get('n_hvp', '-')!s:>9} {r['seconds']:8.1f}")
    write_results(args.out, {"benchmark": "memory", "width": args.width, "depth": args.depth,
                             "samples": args.samples, "device": args.device, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
