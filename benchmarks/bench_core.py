"""Speed and accuracy of hesslens beside PyHessian, hessian-eigenthings and curvlinops.

Every tool runs in this one process on the same model, data, loss module and seed, with its own
default settings, and its Hessian-vector products are counted here (see ``_peers.py``).

1. MNIST-1D MLP (zoo ``"mlp"``, 512 training samples): top-5 eigenvalues and the trace against
   a dense float64 reference Hessian built with ``torch.func`` (forward-over-reverse, the same
   products as ``torch.func.hessian``, vmapped over chunks of basis vectors to bound memory).
2. CIFAR-shaped ResNet-20 in eval mode on 256 synthetic inputs: the top eigenvalue (agreement
   measured against hesslens, as no dense reference fits), the cost of one gradient, of a single
   product and of a batch of 8 products, relative to that gradient.

Usage::

    python benchmarks/bench_core.py                 # full run (write benchmarks/results/core.json)
    python benchmarks/bench_core.py --quick         # smoke test, about two minutes on 2 cores
    python benchmarks/bench_core.py --peers pyhessian --threads 4 --out /tmp/core.json

Peers that do not import are listed with the reason and skipped; a peer that fails or runs past
``--timeout`` seconds on a task gets an error string in its row.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peers import ALL_TOOLS, PEER_NAMES, Answer, Tool, fresh, median_seconds

from hesslens.zoo import build_model, load_dataset

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "core.json"


# ------------------------------------------------------------------------------ environment
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(tools: list[Tool], unavailable: dict[str, str], threads: int) -> dict[str, Any]:
    import scipy

    import hesslens

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "hesslens": hesslens.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "threads": threads,
        "peers": {t.name: t.version() for t in tools if t.name != "hesslens"},
        "peers_unavailable": unavailable,
    }


# ------------------------------------------------------------------------------ running a tool
class Timeout(Exception):
    pass


def attempt(fn, timeout: float) -> tuple[Any, float, str | None]:
    """Run ``fn()``; return (result, seconds, error). Errors and timeouts become strings."""
    fired = []

    def alarm(signum, frame):
        fired.append(True)
        raise Timeout()

    use_alarm = timeout > 0 and hasattr(signal, "setitimer")
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    t0 = time.perf_counter()
    try:
        result = fn()
        return result, time.perf_counter() - t0, None
    except Exception as exc:
        # Code that calls back into Python (TorchScript, C++ loops) may wrap our Timeout in an
        # exception of its own, so trust the flag rather than the type.
        if fired:
            return None, time.perf_counter() - t0, f"timed out after {timeout:g} s"
        return None, time.perf_counter() - t0, describe(exc)
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def describe(exc: BaseException) -> str:
    """One line: the exception type, the first and last lines of its message, and where."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" ({Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    if len(lines) > 1:
        msg = f"{msg[:150]} ... {lines[-1][:150]}"
    return f"{type(exc).__name__}: {msg}{where}"


def paired_timing(run, gradient, reps: int) -> tuple[float, float, list[list[float]]]:
    """Median seconds of ``run()``, median of ``run`` / ``gradient`` over pairs timed back to
    back, and the pairs; one untimed ``run()`` first (hesslens chooses its product path then)."""
    run()
    pairs = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        gradient()
        t1 = time.perf_counter()
        run()
        t2 = time.perf_counter()
        pairs.append([t2 - t1, t1 - t0])
    run_s = float(np.median([p[0] for p in pairs]))
    ratio = float(np.median([p[0] / p[1] for p in pairs]))
    return run_s, ratio, pairs


def warm_up() -> None:
    """Pay one-off costs before any timing: the first ``torch.func`` transform imports a few
    hundred modules (seconds), and the first double backward allocates."""
    from torch.func import grad, jvp, vmap

    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    w = torch.ones(3, requires_grad=True)

    def f(t):
        return (t**3).sum() + net(t.repeat(2)[:4]).sum()

    vmap(lambda v: jvp(grad(f), (w.detach(),), (v,))[1])(torch.eye(3))
    (g,) = torch.autograd.grad(f(w), w, create_graph=True)
    torch.autograd.grad(g, w, torch.ones(3))


def seeded(seed: int, fn):
    def run():
        torch.manual_seed(seed)
        np.random.seed(seed)
        return fn()

    return run


def calib_note(ans: Answer) -> str:
    c = ans.extra.get("calibration_products")
    return f" ({c} of them timing paths)" if c else ""


def max_rel_error(values: list[float], ref: list[float], which: str = "LA") -> float | None:
    """Largest relative error of the k values against the reference's k, both ordered the way
    ``which`` ranks them (``"LA"``: algebraically, ``"LM"``: by magnitude)."""
    if len(values) < len(ref):
        return None
    key = abs if which == "LM" else (lambda v: v)
    values = sorted(values, key=key, reverse=True)
    ref = sorted(ref, key=key, reverse=True)
    return max(abs(v - r) / max(abs(r), 1e-30) for v, r in zip(values, ref))


# ------------------------------------------------------------------------------ references
def dense_hessian(model: nn.Module, loss: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  chunk: int = 256) -> torch.Tensor:
    """The float64 Hessian of ``loss(model(x), y)`` over the flat trainable parameters, by
    ``torch.func`` forward-over-reverse (``jvp`` of ``grad``, as ``torch.func.hessian`` does),
    vmapped over ``chunk`` basis vectors at a time. Independent of hesslens."""
    from torch.func import functional_call, grad, jvp, vmap

    m = fresh(model).double()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in m.named_parameters() if p.requires_grad]
    sizes = [math.prod(s) for s in shapes]
    theta = torch.cat([p.detach().reshape(-1) for p in m.parameters() if p.requires_grad])
    x64 = x.double()

    def f(t):
        params = {n: c.reshape(s) for n, c, s in zip(names, torch.split(t, sizes), shapes)}
        return loss(functional_call(m, params, (x64,)), y)

    g = grad(f)

    def hv(v):
        return jvp(g, (theta,), (v,))[1]

    n = theta.numel()
    rows = []
    for start in range(0, n, chunk):
        eye = torch.zeros(min(chunk, n - start), n, dtype=torch.float64)
        eye[:, start:start + eye.shape[0]].fill_diagonal_(1.0)
        rows.append(vmap(hv)(eye))
    H = torch.cat(rows)
    return (H + H.T) / 2


def top_k_dense(H: torch.Tensor, k: int, which: str = "LA") -> list[float]:
    """The k largest (``"LA"``) or largest-magnitude (``"LM"``) eigenvalues of a dense
    symmetric matrix, to machine precision, in descending order."""
    from scipy.sparse.linalg import eigsh

    A = H.numpy()
    v0 = np.random.default_rng(0).standard_normal(A.shape[0])
    vals = eigsh(A, k=k, which=which, tol=0, v0=v0, return_eigenvectors=False)
    return sorted((float(v) for v in vals), reverse=True)


# ------------------------------------------------------------------------------ the tasks
class Bench:
    def __init__(self, args: argparse.Namespace, tools: list[Tool]) -> None:
        self.args = args
        self.tools = tools
        self.rows: list[dict[str, Any]] = []
        self.details: dict[str, Any] = {}

    def row(self, task: str, tool: str, seconds: float | None, products: int | None = None,
            rel_error: float | None = None, note: str = "", error: str | None = None,
            **extra: Any) -> dict[str, Any]:
        r = {"task": task, "tool": tool, "seconds": seconds, "products": products,
             "rel_error": rel_error, "note": note, "error": error, **extra}
        self.rows.append(r)
        status = f"ERROR {error}" if error else f"{seconds:.3g} s"
        print(f"  [{task}] {tool}: {status}", flush=True)
        return r

    def run_estimator(self, tool: Tool, task: str, method: str, *call_args) -> list[Answer]:
        """Run one estimator ``repeats`` times (a fresh operator each time)."""
        answers, times = [], []
        for _ in range(self.args.repeats):
            fn = getattr(tool, method)
            ans, secs, err = attempt(seeded(self.args.seed, lambda fn=fn: fn(*call_args)),
                                     self.args.timeout)
            if err is not None:
                self.row(task, tool.name, None, error=err)
                return []
            answers.append(ans)
            times.append(secs)
        ans = answers[-1]
        ans.extra["seconds_all"] = times
        ans.extra["seconds"] = float(np.median(times))
        return answers

    # ---------------------------------------------------------------------- MLP on MNIST-1D
    def mlp(self) -> None:
        a = self.args
        ds = load_dataset("mnist1d")
        x, y = ds.x_train[: a.mlp_samples], ds.y_train[: a.mlp_samples]
        model = build_model("mlp", ds.input_shape, ds.num_classes, seed=a.seed,
                            hidden=tuple(a.mlp_hidden))
        model.eval()
        loss = nn.CrossEntropyLoss()
        dim = sum(p.numel() for p in model.parameters())
        info: dict[str, Any] = {"samples": len(x), "hidden": list(a.mlp_hidden), "dim": dim,
                                "k": a.k}
        self.details["mlp"] = info
        print(f"MNIST-1D MLP: {dim} parameters, {len(x)} samples", flush=True)

        ref_vals = ref_trace = None
        if dim <= a.dense_max:
            t0 = time.perf_counter()
            H = dense_hessian(model, loss, x, y)
            t1 = time.perf_counter()
            ref_vals = {"LA": top_k_dense(H, a.k, "LA"), "LM": top_k_dense(H, a.k, "LM")}
            ref_trace = float(torch.trace(H))
            info["reference"] = {
                "method": "torch.func jvp-of-grad (as torch.func.hessian), float64, dense; "
                          "scipy eigsh(tol=0) on it",
                "build_seconds": t1 - t0, "eig_seconds": time.perf_counter() - t1,
                "top_eigenvalues": ref_vals["LA"],
                "top_magnitude_eigenvalues": ref_vals["LM"], "trace": ref_trace,
            }
            del H
            self.row("mlp reference", "torch.func dense f64", t1 - t0, dim,
                     note=f"top={ref_vals['LA'][0]:.6g} tr={ref_trace:.6g}")
        else:
            info["reference"] = None
            print(f"  no dense reference: {dim} > --dense-max {a.dense_max}")

        task = f"mlp top-{a.k}"
        hint: dict[str, Any] = {}
        for tool in self.tools:
            answers = self.run_estimator(tool, task, "top_eigenvalues", model, loss, (x, y),
                                         a.k, hint)
            if not answers:
                continue
            ans = answers[-1]
            which = ans.extra.get("which", "LA")
            err = max_rel_error(ans.values, ref_vals[which], which) if ref_vals else None
            # Power iteration and hessian-eigenthings's default rank by magnitude: compare them
            # with the largest-magnitude eigenvalues, and also say how far they are from the
            # largest ones (what a user asking for the top k expects).
            err_la = max_rel_error(ans.values, ref_vals["LA"]) if ref_vals else None
            note = f"top={ans.values[0]:.6g}" + calib_note(ans)
            if which != "LA":
                note += f" (largest |eig|, its definition; vs largest: {fmt(err_la, 'e')})"
            self.row(task, tool.name, ans.extra["seconds"], ans.products, err, note=note,
                     values=ans.values, which=which, rel_error_vs_largest=err_la,
                     extra=ans.extra)

        task = "mlp trace"
        for tool in self.tools:
            answers = self.run_estimator(tool, task, "trace", model, loss, (x, y), hint)
            if not answers:
                continue
            ans = answers[-1]
            if tool.name == "hesslens":
                hint["products"] = ans.products
            err = abs(ans.values[0] - ref_trace) / abs(ref_trace) if ref_trace else None
            self.row(task, tool.name, ans.extra["seconds"], ans.products, err,
                     note=f"tr={ans.values[0]:.6g}" + calib_note(ans), values=ans.values,
                     extra=ans.extra)

    # ---------------------------------------------------------------------- ResNet-20
    def resnet(self) -> None:
        a = self.args
        model = build_model("resnet20", (3, 32, 32), 10, seed=a.seed)
        model.eval()
        g = torch.Generator().manual_seed(a.seed)
        x = torch.randn(a.resnet_inputs, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (a.resnet_inputs,), generator=g)
        loss = nn.CrossEntropyLoss()
        dim = sum(p.numel() for p in model.parameters())
        info: dict[str, Any] = {"inputs": a.resnet_inputs, "dim": dim}
        self.details["resnet20"] = info
        print(f"ResNet-20: {dim} parameters, {a.resnet_inputs} inputs", flush=True)

        # One gradient: forward + backward of the same loss on a plain copy.
        m = fresh(model)
        params = [p for p in m.parameters() if p.requires_grad]

        def gradient():
            return torch.autograd.grad(loss(m(x), y), params)

        grad_s = median_seconds(gradient, a.grad_reps)
        info["gradient_seconds"] = grad_s
        self.row("resnet20 gradient", "torch", grad_s, note="forward+backward, median")

        task = "resnet20 top-1"
        hl_value = None
        for tool in self.tools:
            answers = self.run_estimator(tool, task, "top_eigenvalues", model, loss, (x, y), 1,
                                         {})
            if not answers:
                continue
            ans = answers[-1]
            if tool.name == "hesslens":
                hl_value = ans.values[0]
                info["engine_choice_after_top1"] = ans.extra.get("engine_choice")
            err = (abs(ans.values[0] - hl_value) / abs(hl_value)
                   if hl_value is not None and tool.name != "hesslens" else None)
            self.row(task, tool.name, ans.extra["seconds"], ans.products, err,
                     note=f"top={ans.values[0]:.6g}" + calib_note(ans)
                     + ("" if tool.name == "hesslens" else " (error vs hesslens)"),
                     values=ans.values, extra=ans.extra)

        # Cost of products, set-up excluded, in units of one gradient: each timed call is
        # paired with a gradient timed just before it, so that a change in machine load hits
        # both (the ratio is the median over the pairs).
        for batch in (1, 8):
            task = f"resnet20 hvp x{batch}"
            for tool in self.tools:
                res, _, err = attempt(
                    seeded(a.seed, lambda tool=tool, batch=batch: paired_timing(
                        tool.product_runner(model, loss, (x, y), batch), gradient,
                        a.product_reps)),
                    a.timeout)
                if err is not None:
                    self.row(task, tool.name, None, error=err)
                    continue
                per_vec, per_grad, pairs = res[0] / batch, res[1] / batch, res[2]
                self.row(task, tool.name, per_vec, batch,
                         note=f"{per_grad:.2f} gradients per vector", per_gradient=per_grad,
                         timings=pairs)
        hl = next((t for t in self.tools if t.name == "hesslens"), None)
        if hl is not None and getattr(hl, "last", None) is not None:
            info["engine_choice"] = hl.last.engine_choice
            info["engine_timings"] = getattr(getattr(hl.last, "path_choice", None), "timings", None)
            print(f"  hesslens engine choice: {info['engine_choice']}")


# ------------------------------------------------------------------------------ output
def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's time as a multiple of hesslens's on the same task. For product costs the
    ratio is of the gradient-normalised costs, which a change of machine load between the
    tools' measurements does not move."""
    def key(r):
        return "per_gradient" if r.get("per_gradient") is not None else "seconds"

    base = {r["task"]: r[key(r)] for r in rows if r["tool"] == "hesslens" and r[key(r)]}
    for r in rows:
        b, v = base.get(r["task"]), r.get(key(r))
        r["ratio_to_hesslens"] = v / b if (b and v is not None) else None


def fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "s":
        return f"{v:.3g}"
    if kind == "e":
        return f"{v:.1e}"
    if kind == "r":
        return f"{v:.2f}x"
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    head = ["task", "tool", "seconds", "products", "rel. error", "x hesslens", "note"]
    body = []
    for r in rows:
        note = r["note"] if r["error"] is None else f"ERROR {r['error']}"
        body.append([r["task"], r["tool"], fmt(r["seconds"], "s"), fmt(r["products"], ""),
                     fmt(r["rel_error"], "e"), fmt(r.get("ratio_to_hesslens"), "r"), note])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(head)]
    widths[-1] = len(head[-1])
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2, default=_json_default)
            fh.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small sizes for a smoke test: 128 MLP samples, hidden (32, 32), "
                        "32 ResNet inputs, one repeat")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file ({DEFAULT_OUT})")
    p.add_argument("--peers", default=",".join(PEER_NAMES),
                   help=f"comma-separated peers to run beside hesslens, or 'none' "
                        f"(default: {','.join(PEER_NAMES)})")
    p.add_argument("--tasks", default="mlp,resnet", help="which tasks: mlp, resnet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=5, help="top-k on the MLP (default 5)")
    p.add_argument("--mlp-samples", type=int, default=None, help="default 512 (quick: 128)")
    p.add_argument("--mlp-hidden", type=int, nargs="*", default=None,
                   help="MLP hidden widths (default: the zoo's 64 64; quick: 32 32)")
    p.add_argument("--resnet-inputs", type=int, default=None, help="default 256 (quick: 32)")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs of each estimator, median time reported (default 3; quick: 1)")
    p.add_argument("--grad-reps", type=int, default=None, help="default 7 (quick: 3)")
    p.add_argument("--product-reps", type=int, default=None, help="default 5 (quick: 2)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds one tool may spend on one task (default 1800; quick: 120)")
    p.add_argument("--dense-max", type=int, default=20_000,
                   help="largest MLP for the dense reference (default 20000)")
    a = p.parse_args(argv)
    q = a.quick
    defaults = {"mlp_samples": (512, 128), "mlp_hidden": ([64, 64], [32, 32]),
                "resnet_inputs": (256, 32), "repeats": (3, 1), "grad_reps": (7, 3),
                "product_reps": (5, 2), "timeout": (1800.0, 120.0)}
    for key, (full, quick) in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, quick if q else full)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    wanted = [] if a.peers.strip().lower() == "none" else [
        s.strip() for s in a.peers.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(PEER_NAMES))
    if unknown:
        print(f"error: unknown peer(s) {', '.join(unknown)}; known: {', '.join(PEER_NAMES)}",
              file=sys.stderr)
        return 2
    tasks = {s.strip() for s in a.tasks.split(",") if s.strip()}
    if not tasks or tasks - {"mlp", "resnet"}:
        print("error: --tasks takes mlp, resnet or both", file=sys.stderr)
        return 2

    tools: list[Tool] = []
    unavailable: dict[str, str] = {}
    for cls in ALL_TOOLS:
        if cls.name != "hesslens" and cls.name not in wanted:
            continue
        tool = cls()
        try:
            tool.load()
        except Exception as exc:
            missing = getattr(exc, "name", None)
            if isinstance(exc, ModuleNotFoundError) and missing and missing != tool.module:
                unavailable[tool.name] = f"not installed: needs {missing}"
            else:
                unavailable[tool.name] = f"not installed: {type(exc).__name__}: {exc}"
            print(f"{tool.name}: {unavailable[tool.name]}")
            continue
        tools.append(tool)

    warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
    warm_up()
    env = environment(tools, unavailable, a.threads)
    print(f"torch {env['torch']}, {a.threads} threads, {env['cpu']}, "
          f"peers {env['peers']}", flush=True)
    busy = env["load_average"] and env["load_average"][0] > 0.25 * (os.cpu_count() or 1)
    if busy:
        print(f"warning: load average {env['load_average'][0]:.1f} on {os.cpu_count()} cores: "
              "other work is running, timings will be noisy (and with --threads > 1, "
              "thread contention can slow small operations by orders of magnitude)",
              flush=True)
    bench = Bench(a, tools)
    t0 = time.perf_counter()
    if "mlp" in tasks:
        bench.mlp()
    if "resnet" in tasks:
        bench.resnet()
    for name, why in unavailable.items():
        bench.row("all", name, None, error=why)
    add_ratios(bench.rows)

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    env["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    payload = {"environment": env, "config": config, "details": bench.details,
               "rows": bench.rows, "total_seconds": time.perf_counter() - t0}
    print()
    print(table(bench.rows))
    write_json(a.out, payload)
    print(f"\nwrote {a.out} ({payload['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
