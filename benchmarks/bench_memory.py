"""Peak memory of the operators' estimators on a ~10M-parameter network, in float32 copies of
its parameters above the peak of one gradient.

Each measurement runs in a fresh subprocess (one estimator's peak must not hide another's): the
process builds the model and data, loads the libraries every tool loads on its first products
(``_measure.load_fixed_costs``), records its resident set, then runs one thing and reports
the rise of its peak resident set (``VmHWM``, with glibc's malloc mapping every block above
1 MiB, ``_measure.CHILD_ENV``, so that freed tensors leave it at once; on a GPU
``torch.cuda.max_memory_allocated``).
"gradient" is one ``loss.backward()`` of the same model and batch, the reference the target is
stated against (top-5, trace and density at defaults within 40 float32 parameter copies above
one gradient). Construction is counted in every estimator's peak (on a model above 16 MiB the
operator shares the parameters; on a large model it measures the first batch's forward pass to
decide whether batches run in chunks of rows).

Usage::

    python benchmarks/bench_memory.py                       # 9.6M-parameter MLP, CPU
    python benchmarks/bench_memory.py --width 1024 --device cuda
    python benchmarks/bench_memory.py --model cnn --cases gradient "trace()"
    python benchmarks/bench_memory.py --model resnet18 --quick   # CIFAR ResNet-18 (11.2M)

``--model cnn`` is a wide plain CNN (9.3M parameters at the default width 384, 16x16 inputs);
``--quick`` caps the products (trace ``max_hvp=62``, density ``n_steps=10``) where the cap does
not change the peak (the probe batches and the SLQ group are the same from the first
products on; eigenvalues and density's deflation run in full).

prints a table and writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _measure import CHILD_ENV, load_fixed_costs, vm, write_results

CASES = ("gradient", "hessian-construction", "eigenvalues(k=1)", "eigenvalues(k=5)", "trace()",
         "traces()", "density()")


def _network(name: str, width: int, depth: int):
    """The model and its input shape."""
    import torch

    if name == "resnet18":
        from hesslens.zoo import resnet18

        return resnet18((3, 32, 32), 10), (3, 32, 32)
    if name == "cnn":
        c = width
        conv = torch.nn.Conv2d
        return torch.nn.Sequential(
            conv(3, c, 3, padding=1), torch.nn.ReLU(), conv(c, c, 3, padding=1),
            torch.nn.ReLU(), torch.nn.MaxPool2d(2), conv(c, 2 * c, 3, padding=1),
            torch.nn.ReLU(), conv(2 * c, 2 * c, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2 * c, 10),
        ), (3, 16, 16)
    layers: list[torch.nn.Module] = [torch.nn.Linear(784, width), torch.nn.Tanh()]
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    layers.append(torch.nn.Linear(width, 10))
    return torch.nn.Sequential(*layers), (784,)


def _child(case: str, model_name: str, width: int, depth: int, samples: int, device: str,
           quick: bool) -> dict:
    import torch

    import hesslens as hl

    torch.manual_seed(0)
    dev = torch.device(device)
    model, shape = _network(model_name, width, depth)
    model = model.to(dev)
    x = torch.randn(samples, *shape, device=dev)
    y = torch.randint(0, 10, (samples,), device=dev)
    n = sum(p.numel() for p in model.parameters())
    loss_fn = torch.nn.functional.cross_entropy

    def peak() -> int:
        if dev.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return vm("VmHWM")

    load_fixed_costs()
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else vm("VmRSS")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    extra: dict = {}
    if case == "gradient":
        loss_fn(model(x), y).backward()
    else:
        H = hl.Hessian(model, loss_fn, (x, y))
        if case.startswith("eigenvalues(k="):
            r = H.eigenvalues(k=int(case[len("eigenvalues(k="):-1]))
            extra = {"n_hvp": r.n_hvp, "converged": bool(r.converged.all()),
                     "top": [float(v) for v in r.values]}
        elif case == "trace()":
            r = H.trace(max_hvp=62) if quick else H.trace()
            extra = {"n_hvp": r.n_hvp, "value": r.value, "stderr": r.stderr}
        elif case == "traces()":
            full, _ = H.traces(max_hvp=62) if quick else H.traces()
            extra = {"n_hvp": full.n_hvp, "value": full.value, "stderr": full.stderr}
        elif case == "density()":
            s = H.density(n_steps=10) if quick else H.density()
            extra = {"n_hvp": H.n_products, "nodes": len(s.nodes)}
        extra["choice"] = H.engine_choice
    seconds = time.perf_counter() - t0
    return {"case": case, "n_params": n, "bytes": peak() - base, "seconds": seconds, **extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "cnn", "resnet18"), default="mlp")
    parser.add_argument("--width", type=int, default=None,
                        help="MLP width (default 2048) or CNN channels (default 384)")
    parser.add_argument("--quick", action="store_true",
                        help="cap the products where that does not change the peak")
    parser.add_argument("--depth", type=int, default=3, help="hidden layers")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    args = parser.parse_args(argv)
    if args.width is None:
        args.width = 384 if args.model == "cnn" else 2048
    if args.child:
        print(json.dumps(_child(args.child, args.model, args.width, args.depth, args.samples,
                                args.device, args.quick)))
        return 0
    rows = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "--child", case, "--width", str(args.width),
               "--depth", str(args.depth), "--samples", str(args.samples),
               "--device", args.device, "--model", args.model,
               *(["--quick"] if args.quick else [])]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=CHILD_ENV)
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
    write_results(args.out, {"benchmark": "memory", "model": args.model, "width": args.width,
                             "depth": args.depth, "samples": args.samples,
                             "device": args.device, "quick": args.quick,
                             "load_average": os.getloadavg(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
