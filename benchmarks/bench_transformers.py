"""Products on the models people study today, hesslens beside its peers: a tiny Hugging Face
GPT-2 (the zoo's gpt-nano on modular addition), the zoo's vit-tiny on digits, and the zoo's CIFAR
ResNet-18, each as it comes (mapping batches and the model's own loss for the Hugging Face
models, the default attention).

Tools (``_peers.product_function`` says how each is called and what wrapping it needs):
hesslens (the engine's choice of exact path, and ``path="fd"``), curvlinops
(``HessianLinearOperator``), hessian-eigenthings (its exact ``HessianOperator`` and its
``method="finite_difference"``) and PyHessian. On the Hugging Face models the tools that need
double backward or forward-mode AD through attention fail on the default (fused) kernel; they
are reported as that error and run again under ``sdpa_kernel(SDPBackend.MATH)`` (rows
``+math``), the change a user has to make.

For each model, in one process and one thread, every tool on its own copy of the model and the
same batch and unit vector: the time of one product in units of one gradient (the paired method
of ``bench_core.py``: each product timed right after a gradient, the ratio the median over the
pairs, so that machine load hits both), the set-up (construction and first product), the
relative error of the product against the exact float64 product (hesslens's double backward on a
float64 copy), and for the fd operators the same in float64; then, in a fresh subprocess per
(tool, model), the rise of the peak resident set (``VmHWM``) over the model's for two products,
beside one gradient's. The load average is recorded beside the timings.

Usage::

    /tmp/benchvenv/bin/python benchmarks/bench_transformers.py         # all models and tools
    python benchmarks/bench_transformers.py --tools hesslens hesslens-fd   # without the peers
    /tmp/benchvenv/bin/python benchmarks/bench_transformers.py --models gpt-nano --repeats 9

prints a table and writes ``benchmarks/results/transformers.json``.
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

MODELS = ("gpt-nano", "vit-tiny", "resnet18")


def _setup(name: str, dtype, split: tuple[int, ...] | None = None):
    """The model, its zoo loss (``None``: its own) and batches; ``split``: batch sizes for
    gpt-nano's first ``sum(split)`` sequences instead of one batch of 46."""
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
    if split is None:
        return model, zoo.model_loss(name), zoo.model_batches(name, x, y)
    batches, start = [], 0
    for size in split:
        batches += zoo.model_batches(name, x[start:start + size], y[start:start + size])
        start += size
    return model, zoo.model_loss(name), batches


def _gradient(model, loss_fn, batches):
    import torch

    for b in batches:
        out = model(**b) if isinstance(b, dict) else model(b[0])
        loss = out.loss if loss_fn is None else loss_fn(out, b[1])
        torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def _jobs(name: str, tools: list[str]) -> list[tuple[str, bool]]:
    from _peers import NEEDS_DOUBLE_BACKWARD

    hf = name != "resnet18"
    out = []
    for tool in tools:
        out.append((tool, False))
        if hf and tool in NEEDS_DOUBLE_BACKWARD:
            out.append((tool, True))
    return out


def _label(tool: str, math: bool) -> str:
    return tool + (" +math" if math else "")


def _unit(dim: int, dtype):
    import torch

    v = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (v / v.norm()).to(dtype)


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _worst_blocks(product, exact, model, limit: float = 1e-3) -> dict[str, float]:
    """The parameter blocks where ``product`` is off the exact one by more than ``limit``
    (relative, per block), worst first, at most five; blocks whose exact product is below
    1e-6 of the whole (a key bias's, which attention ignores: zero up to rounding) are left
    out."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    floor = 1e-6 * float(exact.norm())
    errs = {n: _rel(a, b) for n, a, b in zip(names, product.split(sizes), exact.split(sizes))
            if float(b.norm()) > floor}
    worst = sorted((e, n) for n, e in errs.items() if e > limit)[::-1][:5]
    return {n: e for e, n in worst}


def _speed(name: str, tools: list[str], repeats: int) -> dict:
    import torch
    from _peers import product_function
    from bench_core import describe, paired_timing

    import hesslens as hl

    torch.set_num_threads(1)
    load_start = os.getloadavg()
    model, loss_fn, batches = _setup(name, torch.float32)
    model64, loss64, batches64 = _setup(name, torch.float64)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    v = _unit(n, torch.float32)
    exact64 = hl.Hessian(model64, loss64, batches64, path="reverse").hvp(v.double())
    exact32 = hl.Hessian(model, loss_fn, batches, path="reverse").hvp(v)
    rows = []
    for tool, math in _jobs(name, tools):
        row: dict = {"model": name, "tool": _label(tool, math), "math_attention": math}
        try:
            t0 = time.perf_counter()
            product, row["how"] = product_function(tool, model, loss_fn, batches, math)
            first = product(v)
            row["setup_seconds"] = time.perf_counter() - t0
            if hasattr(product, "__self__"):  # hesslens: H.hvp
                row["path"] = product.__self__.engine_choice.get("single")
            seconds, ratio, pairs = paired_timing(lambda f=product: f(v), lambda: _gradient(
                model, loss_fn, batches), repeats)
            row.update(product_seconds=seconds, product_gradients=ratio, pairs=pairs,
                       rel_error_vs_exact_float64=_rel(first, exact64),
                       rel_diff_vs_exact_float32=_rel(first, exact32),
                       blocks_off_by_1e_3=_worst_blocks(first, exact64, model))
            if tool.endswith("-fd"):
                f64, _ = product_function(tool, model64, loss64, batches64, math)
                row["fd_rel_error_float64"] = _rel(f64(v.double()), exact64)
        except Exception as err:  # a tool that fails is a row, not a crash
            row["error"] = describe(err)
        rows.append(row)
        print(f"  {name} {row['tool']}: {row.get('product_gradients', row.get('error'))}",
              file=sys.stderr, flush=True)
    grads = [p[1] for r in rows for p in r.get("pairs", [])]
    return {"n_params": n, "gradient_seconds": float(sorted(grads)[len(grads) // 2])
            if grads else None, "load_average_start": load_start,
            "load_average_end": os.getloadavg(), "rows": rows}


def _memory(name: str, tool: str, math: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    model, loss_fn, batches = _setup(name, torch.float32)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    v = _unit(n, torch.float32)
    load_fixed_costs()
    base = vm("VmRSS")
    if tool == "gradient":
        _gradient(model, loss_fn, batches)
    else:
        from _peers import product_function

        product, _ = product_function(tool, model, loss_fn, batches, math)
        product(v)
        product(v)
    return {"peak_rise_bytes": vm("VmHWM") - base}


def _run_child(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                          text=True, check=False, cwd=Path(__file__).parent,
                          env=CHILD_ENV)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        return {"error": lines[-1] if lines else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> None:
    print(f"\n{'model':<9} {'tool':<27} {'Hv/grad':>8} {'setup s':>8} {'err vs f64':>10} "
          f"{'fd err f64':>10} {'peak MB':>8}  note")
    for r in rows:
        mb = r.get("peak_rise_bytes")
        mb = f"{mb / 2**20:8.1f}" if mb is not None else f"{'-':>8}"
        if "error" in r and "product_gradients" not in r:
            print(f"{r['model']:<9} {r['tool']:<27} {'error':>8} {'':>8} {'':>10} {'':>10} "
                  f"{mb}  {r['error'][:110]}")
            continue
        if r["tool"] == "gradient":
            print(f"{r['model']:<9} {'(one gradient)':<27} {1.0:8.2f} {'':>8} {'':>10} {'':>10} "
                  f"{mb}  {r.get('seconds', 0):.4f} s")
            continue
        fd = r.get("fd_rel_error_float64")
        print(f"{r['model']:<9} {r['tool']:<27} {r['product_gradients']:8.2f} "
              f"{r['setup_seconds']:8.2f} {r['rel_error_vs_exact_float64']:10.1e} "
              f"{'' if fd is None else f'{fd:.1e}':>10} {mb}  {r.get('path') or ''}")


def main(argv: list[str] | None = None) -> int:
    from _peers import PRODUCT_TOOLS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--tools", nargs="*", default=list(PRODUCT_TOOLS))
    parser.add_argument("--repeats", type=int, default=7, help="timed (gradient, product) pairs")
    parser.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "transformers.json"))
    args = parser.parse_args(argv)
    if args.child:
        kind, name, *rest = args.child
        out = (_speed(name, rest, args.repeats) if kind == "speed"
               else _memory(name, rest[0], rest[1] == "math"))
        print(json.dumps(out))
        return 0
    load_start, t_start = os.getloadavg(), time.time()
    rows, details = [], {}
    for name in args.models:
        speed = _run_child(["speed", name, *args.tools, "--repeats", str(args.repeats)])
        if "error" in speed:
            rows.append({"model": name, "tool": "all", "error": speed["error"]})
            continue
        details[name] = {k: v for k, v in speed.items() if k != "rows"}
        grad = _run_child(["memory", name, "gradient", "plain"])
        rows.append({"model": name, "tool": "gradient", "seconds": speed["gradient_seconds"],
                     "peak_rise_bytes": grad.get("peak_rise_bytes"), **(
                         {"memory_error": grad["error"]} if "error" in grad else {})})
        for row in speed["rows"]:
            if "error" not in row:
                mem = _run_child(["memory", name, row["tool"].split()[0],
                                  "math" if row["math_attention"] else "plain"])
                row["peak_rise_bytes"] = mem.get("peak_rise_bytes")
                if "error" in mem:
                    row["memory_error"] = mem["error"]
            rows.append(row)
        print(f"{name}: done, load average {os.getloadavg()}", file=sys.stderr, flush=True)
    _table(rows)
    from _peers import ALL_TOOLS

    versions = {t.name: t().version() for t in ALL_TOOLS}
    write_results(args.out, {
        "benchmark": "transformers", "threads": 1, "repeats": args.repeats,
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "wall_seconds": time.time() - t_start, "versions": versions,
        "command": "python benchmarks/bench_transformers.py " + " ".join(argv or sys.argv[1:]),
        "models": details, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
