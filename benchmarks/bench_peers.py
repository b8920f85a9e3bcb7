"""Peak memory and cost of top-5, trace and density: hesslens beside its peers, on the zoo's
CIFAR ResNet-18 (11.2M parameters, 16 inputs) by default.

Each (tool, task) runs in a fresh subprocess: the process builds the model and the batch,
records its resident set, runs the task with the tool's own defaults (``_peers.py`` says which)
and reports the rise of its peak resident set (``VmHWM``) in float32 copies of the parameters,
above that of one gradient (``loss.backward()`` of the same model and batch, measured the same
way), the products it spent (counted by us) and its seconds. Tasks a tool does not have are
left out: PyHessian has all three (``eigenvalues(top_n=5)``, ``trace()``, ``density()``; its
density calls ``torch.eig``, which torch 2 removed, and is reported as that error);
hessian-eigenthings top-5 and trace; curvlinops top-5 (scipy's ``eigsh``) and trace
(``hutchpp_trace`` given hesslens's product count). The peers need their own environment (see
``benchmarks/README.md``): run this script with that environment's python.

The machine's load average is recorded beside the numbers: seconds on a loaded machine are noise,
the memory and the product counts are not.

Usage::

    /tmp/benchvenv/bin/python benchmarks/bench_peers.py                   # ResNet-18, all
    /tmp/benchvenv/bin/python benchmarks/bench_peers.py --tools hesslens pyhessian --quick
    /tmp/benchvenv/bin/python benchmarks/bench_peers.py --model cnn --width 64   # a smoke run

``--quick`` caps the products where the cap does not change the peak (hesslens's trace
``max_hvp=62``: its sketch and probe batches are the same; its density ``n_steps=10``: SLQ keeps
no basis; PyHessian's trace ``maxIter=20``: Hutchinson keeps one probe; its top-5 ``maxIter=20``
for each value: power iteration keeps the vectors it found and one more; curvlinops's trace
``num_matvecs=63``, given hesslens's capped count; curvlinops's top-5 ``eigsh(maxiter=3)``:
ARPACK's 20-vector workspace is full from the first cycle). Never capped: PyHessian's density
(it keeps every Lanczos vector) and hessian-eigenthings's trace (Hutch++ keeps a
sketch of a third of its budget). Writes ``benchmarks/results/peers.json``.
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

TASKS = ("top1", "top5", "trace", "density")
SUPPORT = {"hesslens": TASKS, "pyhessian": TASKS,
           "hessian-eigenthings": ("top1", "top5", "trace"),
           "curvlinops": ("top1", "top5", "trace")}


def _child(tool: str, task: str, model_name: str, width: int, samples: int,
           quick: bool) -> dict:
    import _peers
    import torch
    from bench_memory import _network

    torch.manual_seed(0)
    model, shape = _network(model_name, width, 3)
    model.eval()
    x = torch.randn(samples, *shape)
    y = torch.randint(0, 10, (samples,))
    data = (x, y)
    loss = torch.nn.CrossEntropyLoss()
    n = _peers.n_params(model)
    load_fixed_costs()
    base = vm("VmRSS")
    start = time.perf_counter()
    extra: dict = {}
    if tool == "gradient":
        loss(model(x), y).backward()
        products = 0
    elif tool == "hesslens":
        import hesslens as hl

        H = hl.Hessian(model, loss, data)
        if task in ("top1", "top5"):
            extra["values"] = [float(v) for v in H.eigenvalues(k=int(task[3:])).values]
        elif task == "trace":
            r = H.trace(max_hvp=62) if quick else H.trace()
            extra["values"] = [r.value]
        else:
            extra["nodes"] = len((H.density(n_steps=10) if quick else H.density()).nodes)
        products = H.n_products + H.path_choice.calibration_products
        extra["choice"] = H.engine_choice
    elif tool == "pyhessian" and task == "density":
        # Never capped: it keeps every Lanczos vector (v_list), so its peak grows with iter.
        # After its 100 products it calls torch.eig, which torch 2 removed: the peak of the
        # Lanczos phase (all its memory work) is reported with that error.
        counter = _peers.Counter()
        ph = _peers.PyHessian()
        with ph._counting(counter):
            h = ph._hessian(model, loss, data)
            try:
                h.density(iter=100, n_v=1)
            except (AttributeError, RuntimeError) as err:
                extra["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        products = counter.n
    elif tool == "curvlinops" and task == "top5" and quick:
        # ARPACK's workspace is ncv = 20 vectors from the first Arnoldi cycle on; later
        # restarts reuse it, so capping the restarts (maxiter=3, about 50 products) leaves the
        # peak as it is. The values are then not converged (reported as such).
        from scipy.sparse.linalg import ArpackNoConvergence, eigsh

        adapter, counter = _peers.Curvlinops(), _peers.Counter()
        with adapter._counting(counter):
            op = adapter._operator(model, loss, data).to_scipy()
            try:
                vals = eigsh(op, k=5, which="LA", maxiter=3, return_eigenvectors=False)
                extra["converged"] = True
            except ArpackNoConvergence as err:
                vals, extra["converged"] = err.eigenvalues, False
        products, extra["values"] = counter.n, sorted((float(x) for x in vals), reverse=True)
        extra["cap"] = "eigsh maxiter=3"
    else:
        adapter = {t.name: t for t in _peers.ALL_TOOLS}[tool]()
        if tool == "pyhessian" and task == "trace" and quick:
            counter = _peers.Counter()
            with adapter._counting(counter):
                adapter._hessian(model, loss, data).trace(maxIter=20)
            answer = _peers.Answer([], counter.n)
        elif tool == "pyhessian" and task in ("top1", "top5") and quick:
            # Power iteration keeps the found eigenvectors, one vector and its product, however
            # many iterations it runs: maxIter=20 (of 100) for each value leaves the peak.
            counter = _peers.Counter()
            with adapter._counting(counter):
                vals, _ = adapter._hessian(model, loss, data).eigenvalues(
                    top_n=int(task[3:]), maxIter=20)
            answer = _peers.Answer(sorted((float(x) for x in vals), reverse=True), counter.n)
            extra["cap"] = "maxIter=20"
        elif task in ("top1", "top5"):
            answer = adapter.top_eigenvalues(model, loss, data, int(task[3:]), {})
        else:
            answer = adapter.trace(model, loss, data, {"products": 62 if quick else 1000})
        products, extra["values"] = answer.products, answer.values
    seconds = time.perf_counter() - start
    return {"tool": tool, "task": task, "n_params": n, "bytes": vm("VmHWM") - base,
            "products": products, "seconds": seconds, "threads": torch.get_num_threads(),
            **extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("resnet18", "cnn", "mlp"), default="resnet18")
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tools", nargs="*", default=list(SUPPORT))
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "peers.json"))
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child, args.model, args.width, args.samples,
                                args.quick)))
        return 0
    jobs = [("gradient", "-")] + [(t, k) for t in args.tools for k in args.tasks
                                  if k in SUPPORT.get(t, ())]
    rows = []
    load_start = os.getloadavg()
    for tool, task in jobs:
        cmd = [sys.executable, __file__, "--child", tool, task, "--model", args.model,
               "--width", str(args.width), "--samples", str(args.samples),
               *(["--quick"] if args.quick else [])]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              cwd=Path(__file__).parent, env=CHILD_ENV)
        if done.returncode != 0:
            rows.append({"tool": tool, "task": task,
                         "error": done.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {tool} {task}: {rows[-1].get('bytes', rows[-1].get('error'))}", flush=True)
    grad = next((r["bytes"] for r in rows if r["tool"] == "gradient" and "bytes" in r), 0)
    print(f"{'tool':<20} {'task':<8} {'copies above grad':>18} {'products':>9} {'seconds':>8}")
    for r in rows:
        if "bytes" in r:
            r["copies_above_gradient"] = (r["bytes"] - grad) / (4 * r["n_params"])
            print(f"{r['tool']:<20} {r['task']:<8} {r['copies_above_gradient']:18.1f} "
                  f"{r['products']:>9} {r['seconds']:8.1f}  {r.get('error', '')}")
        else:
            print(f"{r['tool']:<20} {r['task']:<8} error: {r['error']}")
    write_results(args.out, {"benchmark": "peers", "model": args.model, "samples": args.samples,
                             "quick": args.quick, "load_average_start": load_start,
                             "load_average": os.getloadavg(),
                             "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
