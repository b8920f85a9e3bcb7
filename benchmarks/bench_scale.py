"""A GPT-2-small-sized model (124M parameters, built from ``GPT2Config()``, never downloaded) on
this machine's CPU cores: one gradient, one product, the top eigenvalue of the full Hessian
(and what a product costs inside that run), the top eigenvalue of every q/k/v/o/MLP block of a
middle layer and the full trace to 10 %, with seconds, products and peak memory; PyHessian and
hessian-eigenthings beside it on the same model and data where they run.

Data: ``--sequences`` random token sequences of ``--tokens`` tokens (seeded), the model's own
causal-LM loss. Each task runs in a fresh process and reports the rise of its peak resident set
(``VmHWM``) over the process after building the model and data, in MiB and in float32 copies of
the parameters above one gradient's rise. The peers are called as in ``bench_transformers.py``
(their HF wrapping, under PyTorch's math attention kernel, which they need for double backward;
hesslens takes the model as it comes); install them as ``benchmarks/README.md`` says and put
them on ``PYTHONPATH`` (e.g. ``pip install --no-deps --target /tmp/peers pyhessian==0.1
hessian-eigenthings==1.0.0a5``).

Usage::

    python benchmarks/bench_scale.py                          # 8 x 128 tokens, every task
    python benchmarks/bench_scale.py --tasks gradient top1 --sequences 4 --tokens 64
    python benchmarks/bench_scale.py --layers 2 --quick       # a small model, to try it out

prints a table and writes ``benchmarks/results/scale.json``.
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

TASKS = ("gradient", "product", "top1", "blocks", "trace", "pyhessian-top1",
         "hessian-eigenthings-top1", "pyhessian-trace", "hessian-eigenthings-trace")
BLOCK_ROLES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp_in", "mlp_out")


def _model_and_data(layers: int, sequences: int, tokens: int):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, loss_type="ForCausalLM")
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (sequences, tokens),
                        generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids.clone()}


def _child(task: str, args: argparse.Namespace) -> dict:
    import torch

    import hesslens as hl

    model, batch = _model_and_data(args.layers, args.sequences, args.tokens)
    n = sum(p.numel() for p in model.parameters())
    load_fixed_costs()
    base = vm("VmRSS")
    t0 = time.perf_counter()
    out: dict = {"task": task, "n_params": n}
    if task == "gradient":
        model(**batch).loss.backward()
    elif task in ("product", "top1", "blocks", "trace"):
        H = hl.Hessian(model, None, [batch], layers="transformer")
        out["construction_seconds"] = time.perf_counter() - t0
        if task == "product":
            v = torch.randn(H.dim, generator=torch.Generator().manual_seed(2))
            times = []
            for _ in range(2):
                t = time.perf_counter()
                H.hvp(v)
                times.append(time.perf_counter() - t)
            out.update(first_product_seconds=times[0], product_seconds=times[1])
        elif task == "top1":
            t = time.perf_counter()
            r = H.eigenvalues(k=1)
            out.update(value=float(r.values[0]), converged=bool(r.converged[0]),
                       bound=float(r.bounds[0]), products=int(r.n_hvp),
                       run_seconds=time.perf_counter() - t)
        elif task == "blocks":
            layer = args.layers // 2
            out["blocks"] = {}
            for role in BLOCK_ROLES:
                name = f"transformer.h.{layer}.{role}"
                t = time.perf_counter()
                r = H.block(name).eigenvalues(k=1)
                out["blocks"][name] = {"value": float(r.values[0]),
                                       "converged": bool(r.converged[0]),
                                       "products": int(r.n_hvp),
                                       "seconds": time.perf_counter() - t}
            out["products"] = sum(b["products"] for b in out["blocks"].values())
        else:
            t = time.perf_counter()
            r = H.trace(rtol=0.1)
            out.update(value=r.value, stderr=r.stderr, products=int(r.n_hvp),
                       converged=bool(r.converged), run_seconds=time.perf_counter() - t)
    else:
        out.update(_peer(task, model, batch))
    out["seconds"] = time.perf_counter() - t0
    out["bytes"] = vm("VmHWM") - base
    return out


def _peer(task: str, model, batch) -> dict:
    """A peer's top eigenvalue or trace at its defaults, products counted by wrapping its
    product function (as ``_peers.py`` does)."""
    import torch
    from _peers import IGNORE, Counter, Logits, _targets, attention, patched
    from torch import nn

    tool, what = task.rsplit("-", 1)
    counter = Counter()
    with attention(True):
        if tool == "pyhessian":
            import pyhessian  # noqa: F401
            from pyhessian import hessian

            ph = sys.modules["pyhessian.hessian"]

            def make(orig):
                def counted(g, p, v):
                    counter.add()
                    return orig(g, p, v)
                return counted

            with patched(ph, "hessian_vector_product", make):
                h = hessian(Logits(model, "input_ids"), nn.CrossEntropyLoss(ignore_index=IGNORE),
                            data=(batch["input_ids"], _targets(batch, "input_ids")), cuda=False)
                if what == "top1":
                    values, _ = h.eigenvalues(top_n=1)
                    return {"value": float(values[0]), "products": counter.n,
                            "settings": "eigenvalues(top_n=1): maxIter=100, tol=1e-3"}
                samples = h.trace()
                return {"value": float(sum(samples) / len(samples)), "products": counter.n,
                        "settings": "trace(): maxIter=100, tol=1e-3"}
        import hessian_eigenthings as he

        op = he.HessianOperator(model, [batch], he.hf_lm_loss())
        orig = op.matvec

        def counted(v: torch.Tensor) -> torch.Tensor:
            counter.add()
            return orig(v)

        op.matvec = counted
        if what == "top1":
            res = he.lanczos(op, k=1)
            return {"value": float(res.eigenvalues[0]), "products": counter.n,
                    "converged": bool(res.converged.all()),
                    "settings": "lanczos(op, k=1) defaults"}
        res = he.trace(op)
        return {"value": float(res.estimate), "stderr": float(res.stderr),
                "products": counter.n, "settings": "trace(op) defaults"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 layers (12: GPT-2 small)")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per task")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale.json"))
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args)))
        return 0
    rows = []
    for task in args.tasks:
        cmd = [sys.executable, __file__, "--child", task, "--layers", str(args.layers),
               "--sequences", str(args.sequences), "--tokens", str(args.tokens)]
        load = os.getloadavg()[0]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                  check=False, env=CHILD_ENV)
        except subprocess.TimeoutExpired:
            rows.append({"task": task, "error": f"over {args.timeout:.0f} s"})
            continue
        if done.returncode != 0:
            rows.append({"task": task, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            rows.append({**json.loads(done.stdout.strip().splitlines()[-1]), "load": load})
        last = rows[-1]
        print(f"  {task}: " + (last["error"] if "error" in last else f"{last['seconds']:.0f} s"),
              flush=True)
    grad = next((r for r in rows if r.get("task") == "gradient" and "error" not in r), None)
    g_s = grad["seconds"] if grad else float("nan")
    g_b = grad["bytes"] if grad else 0
    print(f"{'task':<28} {'seconds':>9} {'products':>9} {'s/product in gradients':>23} "
          f"{'peak MiB':>9} {'f32 copies above grad':>22}  value")
    for r in rows:
        if "error" in r:
            print(f"{r['task']:<28} error: {r['error']}")
            continue
        per = None
        if r.get("products"):
            run = r.get("run_seconds", r["seconds"])
            per = run / r["products"] / g_s
            r["product_in_gradients"] = per
        if r["task"] == "product":
            per = r["product_seconds"] / g_s
            r["product_in_gradients"] = per
        r["copies_above_gradient"] = (r["bytes"] - g_b) / (4 * r["n_params"])
        print(f"{r['task']:<28} {r['seconds']:9.1f} {r.get('products', '-')!s:>9} "
              f"{'-' if per is None else f'{per:.2f}':>23} {r['bytes'] / 2**20:9.0f} "
              f"{r['copies_above_gradient']:22.1f}  {r.get('value', '')}")
    write_results(args.out, {"benchmark": "scale", "layers": args.layers,
                             "sequences": args.sequences, "tokens": args.tokens,
                             "threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
