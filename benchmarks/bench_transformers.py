"""Products on the models people study today: a tiny Hugging Face GPT-2 (the zoo's gpt-nano on
modular addition), the zoo's vit-tiny on digits, and the zoo's CIFAR ResNet-18, each as it comes
(mapping batches and the model's own loss for the Hugging Face models, the default attention).

For each model, in one process, one thread at a time on the same batch: the time of one
gradient, of one exact Hessian-vector product (the engine's choice, after its graph is built)
and of one finite-difference product (``path="fd"``, Richardson, four gradients), in units of
one gradient; the relative error of the fd product against the exact one (float32 and float64
copies); and the rise of the peak resident set over the model's for the exact and the fd paths
(each in a fresh subprocess, ``VmHWM``).

Usage::

    python benchmarks/bench_transformers.py                 # all three models, CPU
    python benchmarks/bench_transformers.py --models gpt-nano --repeats 5

prints a table and writes ``benchmarks/results/transformers.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _measure import vm, write_results

MODELS = ("gpt-nano", "vit-tiny", "resnet18")


def _setup(name: str, dtype):
    import torch

    import hesslens.zoo as zoo

    torch.manual_seed(0)
    if name == "gpt-nano":
        ds = zoo.load_dataset("modadd")
        x, y = zoo.token_subset(*ds.train, per_class=2, seed=0)
        model = zoo.build_model(name, ds.input_shape, ds.num_classes, seed=0)
    elif name == "vit-tiny":
        ds = zoo.load_dataset("digits")
        x, y = zoo.analysis_subset(*ds.train, per_class=5, seed=0)
        model = zoo.build_model(name, ds.input_shape, ds.num_classes, seed=0)
    else:
        x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
        model = zoo.build_model(name, (3, 32, 32), 10, seed=0)
    model = model.to(dtype).eval()
    if x.is_floating_point():
        x = x.to(dtype)
    return model, zoo.model_loss(name), zoo.model_batches(name, x, y)


def _gradient(model, loss_fn, batches):
    import torch

    for b in batches:
        out = model(**b) if isinstance(b, dict) else model(b[0])
        loss = out.loss if loss_fn is None else loss_fn(out, b[1])
        torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _child(name: str, mode: str, repeats: int) -> dict:
    import torch

    import hesslens as hl

    torch.set_num_threads(1)
    if mode.startswith("memory-"):
        model, loss_fn, batches = _setup(name, torch.float32)
        base = vm("VmRSS")
        path = mode.removeprefix("memory-")
        H = hl.Hessian(model, loss_fn, batches, path=path)
        H.hvp(torch.ones(H.dim))
        return {"peak_rise_bytes": vm("VmHWM") - base}
    out: dict = {}
    model, loss_fn, batches = _setup(name, torch.float32)
    out["n_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    grad = _timed(lambda: _gradient(model, loss_fn, batches), repeats)
    H = hl.Hessian(model, loss_fn, batches)
    v = torch.randn(H.dim, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    exact = H.hvp(v)  # builds the graph and chooses the path
    out["first_product_gradients"] = (time.perf_counter() - t0) / grad
    out["product_gradients"] = _timed(lambda: H.hvp(v), repeats) / grad
    out["path"] = H.engine_choice.get("single")
    F = hl.Hessian(model, loss_fn, batches, path="fd")
    F.hvp(v)  # learns its step
    out["fd_product_gradients"] = _timed(lambda: F.hvp(v), repeats) / grad
    out["fd_rel_error_float32"] = float((F.hvp(v) - exact).norm() / exact.norm())
    model64, loss64, batches64 = _setup(name, torch.float64)
    H64 = hl.Hessian(model64, loss64, batches64, path="reverse")
    F64 = hl.Hessian(model64, loss64, batches64, path="fd")
    e64 = H64.hvp(v.double())
    out["fd_rel_error_float64"] = float((F64.hvp(v.double()) - e64).norm() / e64.norm())
    out["exact_float32_vs_float64"] = float((exact.double() - e64).norm() / e64.norm())
    out["gradient_seconds"] = grad
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "transformers.json"))
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], args.repeats)))
        return 0
    rows = []
    for name in args.models:
        row = {"model": name}
        for mode in ("speed", "memory-reverse", "memory-fd"):
            done = subprocess.run([sys.executable, __file__, "--child", name, mode,
                                   "--repeats", str(args.repeats)],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                row[f"{mode}_error"] = done.stderr.strip().splitlines()[-1:]
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if mode == "speed":
                row.update(result)
            else:
                row[f"{mode}_bytes"] = result["peak_rise_bytes"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'model':<10} {'params':>9} {'path':>14} {'Hv/grad':>8} {'fd/grad':>8} "
          f"{'fd err f32':>10} {'fd err f64':>10} {'exact MB':>9} {'fd MB':>7}")
    for r in rows:
        if "product_gradients" not in r:
            print(f"{r['model']:<10} error {r}")
            continue
        print(f"{r['model']:<10} {r['n_params']:9d} {r['path']!s:>14} "
              f"{r['product_gradients']:8.2f} {r['fd_product_gradients']:8.2f} "
              f"{r['fd_rel_error_float32']:10.1e} {r['fd_rel_error_float64']:10.1e} "
              f"{r.get('memory-reverse_bytes', 0) / 2**20:9.0f} "
              f"{r.get('memory-fd_bytes', 0) / 2**20:7.0f}")
    write_results(args.out, {"benchmark": "transformers", "threads": 1, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
