"""Strong scaling of the data-parallel operators on CPU: one Hessian-vector product and a top-1
eigenvalue of ResNet-20 (the zoo's, eval mode) on a fixed set of CIFAR-shaped inputs, with 1 and
with 2 processes under torchrun (gloo), one thread each. Each process holds its half of the same
samples; a product is the local product plus one all-reduce of the result.

    python benchmarks/bench_scaling.py            # -> benchmarks/results/scaling.json
    python benchmarks/bench_scaling.py --quick    # smoke run -> results/scaling-quick.json

It needs a quiet machine with at least 2 free cores: the JSON records the load average before
each run and the cores seen, so a contended run can be told apart. The inputs are seeded random
tensors (no data files): timings, not curvature, are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def worker(args: argparse.Namespace) -> None:
    import torch

    import hesslens as hl
    from hesslens.parallel import barrier, process_group_from_env, shard
    from hesslens.zoo import build_model

    torch.set_num_threads(1)
    with process_group_from_env("cpu") as ranks:
        model = build_model("resnet20", (3, 32, 32), 10, seed=0).eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.samples, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (args.samples,), generator=g)
        H = hl.Hessian(model, torch.nn.functional.cross_entropy, (shard(x, ranks), shard(y, ranks)))
        v = torch.randn(H.dim, generator=torch.Generator().manual_seed(1))
        H.hvp(v)  # warm-up: path choice, graph cache
        times = []
        for _ in range(args.repeats):
            barrier(ranks)
            t0 = time.perf_counter()
            H.hvp(v)
            times.append(time.perf_counter() - t0)
        barrier(ranks)
        t0 = time.perf_counter()
        top = H.eigenvalues(k=1, tol=args.tol, max_steps=args.max_steps, seed=0)
        top_seconds = time.perf_counter() - t0
        if ranks.is_main:
            Path(args.part).write_text(json.dumps({
                "world_size": ranks.world, "samples_per_rank": len(shard(y, ranks)),
                "product_seconds": times, "product_median": statistics.median(times),
                "top1_seconds": top_seconds, "top1_n_hvp": int(top.n_hvp),
                "top1_value": float(top.values[0]), "top1_converged": bool(top.converged.all()),
                "dim": int(H.dim)}))


def run_world(world: int, args: argparse.Namespace, folder: Path) -> dict:
    part = folder / f"part-{world}.json"
    load = os.getloadavg()[0]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(world), __file__, "--worker", "--part", str(part), "--samples", str(args.samples),
           "--repeats", str(args.repeats), "--tol", str(args.tol)]
    if args.max_steps is not None:
        cmd += ["--max-steps", str(args.max_steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"world {world} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(part.read_text()), "load_average_before": load}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few samples and products (smoke run)")
    p.add_argument("--samples", type=int, default=None, help="global samples (default 256)")
    p.add_argument("--repeats", type=int, default=None, help="timed products (default 5)")
    p.add_argument("--tol", type=float, default=1e-4, help="top-1 relative tolerance")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.samples is None:
        args.samples = 16 if args.quick else 256
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.quick and args.max_steps is None:
        args.max_steps = 6
    if args.worker:
        worker(args)
        return
    from _measure import write_results

    with tempfile.TemporaryDirectory() as tmp:
        runs = {w: run_world(w, args, Path(tmp)) for w in (1, 2)}
    one, two = runs[1], runs[2]
    record = {
        "benchmark": "strong scaling, ResNet-20 (eval), CPU, gloo, 1 thread per process",
        "quick": args.quick, "samples": args.samples, "repeats": args.repeats, "tol": args.tol,
        "cpu_count": os.cpu_count(), "runs": {str(w): r for w, r in runs.items()},
        "speedup_product": one["product_median"] / two["product_median"],
        "speedup_top1": one["top1_seconds"] / two["top1_seconds"],
        "top1_same_n_hvp": one["top1_n_hvp"] == two["top1_n_hvp"],
        "top1_relative_difference": abs(one["top1_value"] - two["top1_value"])
        / max(abs(one["top1_value"]), 1e-300),
    }
    out = args.out or str(HERE / "results" / ("scaling-quick.json" if args.quick
                                               else "scaling.json"))
    write_results(out, record)
    print(f"product: {one['product_median']:.3f} s (1 process), {two['product_median']:.3f} s "
          f"(2), speedup {record['speedup_product']:.2f}; top-1: {one['top1_seconds']:.2f} s, "
          f"{two['top1_seconds']:.2f} s, speedup {record['speedup_top1']:.2f}; -> {out}")


if __name__ == "__main__":
    main()
