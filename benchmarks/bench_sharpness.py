"""Sharpness while training: products and seconds a record of ``hl.SharpnessMonitor``,
warm-started (each record from the previous record's eigenvectors, the operator reloaded) against
cold (a random start every record), at the same tolerance, on the same weights.

One training loop per setting carries two monitors on the same model and optimizer, recording at
the same steps: ``warm_start=True`` (the default) and ``warm_start=False``. Each record's
products are every Hessian product it used: the top eigenvalue(s), the one product along the
last update, and for Adam the preconditioned sharpness. Settings (the zoo's models and data, all
float32, CPU, one thread):

* ``mlp-gd``: the zoo's MNIST-1D tanh MLP (40-32-32-10) on 100 examples, square loss, full-batch
  gradient descent at lr 0.05 (a smooth run: progressive sharpening, below 2 / lr);
* ``mlp-sgd``, ``cnn1d-sgd``: the zoo's ``mlp`` and ``cnn1d`` on MNIST-1D, cross-entropy,
  SGD with momentum 0.9 on mini-batches of 128, the monitor on the 10-per-class analysis subset;
* ``gpt-nano-adamw``: the zoo's gpt-nano on ``modadd`` (its own loss), AdamW lr 1e-3 on
  mini-batches of 64, the monitor on 64 training sequences: sharpness and Adam's
  preconditioned sharpness.

The first record (cold in both) is left out of the medians. Run::

    python benchmarks/bench_sharpness.py             # -> results/sharpness.json and a table
    python benchmarks/bench_sharpness.py --quick     # fewer steps
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from _measure import write_results
from torch import nn

import hesslens as hl
import hesslens.zoo as zoo

RESULTS = Path(__file__).with_name("results") / "sharpness.json"


def _half_sse(out, target):
    return 0.5 * ((out - target) ** 2).sum(1).mean()


def setting(name: str):
    """(model, optimizer, loss_fn, monitor data, next training batch ()) for a setting."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if name == "gpt-nano-adamw":
        ds = zoo.load_dataset("modadd")
        model = zoo.build_model("gpt-nano", ds.input_shape, ds.num_classes, seed=0)
        x, y = ds.train
        data = zoo.model_batches(model, x[:64], y[:64])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def loss_of_batch():
            idx = torch.randint(0, len(x), (64,), generator=g)
            return model(input_ids=x[idx], labels=y[idx]).loss

        return model, opt, None, data, loss_of_batch
    ds = zoo.load_dataset("mnist1d")
    x, y = ds.train
    if name == "mlp-gd":
        xa, ya = zoo.analysis_subset(x, y, per_class=10, seed=0)
        xa = xa.reshape(len(xa), -1)
        target = nn.functional.one_hot(ya, 10).float()
        model = nn.Sequential(nn.Linear(xa.shape[1], 32), nn.Tanh(), nn.Linear(32, 32),
                              nn.Tanh(), nn.Linear(32, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        return model, opt, _half_sse, (xa, target), lambda: _half_sse(model(xa), target)
    arch = {"mlp-sgd": "mlp", "cnn1d-sgd": "cnn1d"}[name]
    model = zoo.build_model(arch, ds.input_shape, ds.num_classes, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    loss = nn.functional.cross_entropy
    xa, ya = zoo.analysis_subset(x, y, per_class=10, seed=0)

    def loss_of_batch():
        idx = torch.randint(0, len(x), (128,), generator=g)
        return loss(model(x[idx]), y[idx])

    return model, opt, loss, (xa, ya), loss_of_batch


def run(name: str, steps: int, every: int) -> dict:
    model, opt, loss_fn, data, loss_of_batch = setting(name)
    monitors = {mode: hl.SharpnessMonitor(model, loss_fn, data, opt, every=every,
                                          warm_start=(mode == "warm"))
                for mode in ("warm", "cold")}
    train_s = []
    for step in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss_of_batch().backward()
        opt.step()
        train_s.append(time.perf_counter() - t0)
        for mon in monitors.values():
            mon.update(step)
    out = {"setting": name, "steps": steps, "every": every,
           "parameters": sum(p.numel() for p in model.parameters()),
           "train_step_seconds": float(np.median(train_s)),
           "records": len(monitors["warm"].history)}
    for mode, mon in monitors.items():
        recs = mon.history[1:]
        out[mode] = {
            "median_hvp": float(np.median([r["n_hvp"] for r in recs])),
            "mean_hvp": float(np.mean([r["n_hvp"] for r in recs])),
            "median_hvp_sharpness": float(np.median([r["n_hvp_sharpness"] for r in recs])),
            "max_hvp": int(max(r["n_hvp"] for r in recs)),
            "median_seconds": float(np.median([r["seconds"] for r in recs])),
            "converged": all(r["converged"] for r in recs),
            "hvp": [r["n_hvp"] for r in mon.history],
        }
    warm, cold = monitors["warm"].history, monitors["cold"].history
    out["max_rel_diff_sharpness"] = float(max(
        abs(a["sharpness"] - b["sharpness"]) / abs(b["sharpness"]) for a, b in zip(warm, cold)))
    pre = [(a["preconditioned_sharpness"], b["preconditioned_sharpness"])
           for a, b in zip(warm, cold) if a["preconditioned_sharpness"] is not None]
    if pre:
        out["max_rel_diff_preconditioned"] = float(max(abs(a - b) / abs(b) for a, b in pre))
    out["last"] = {k: warm[-1][k] for k in ("step", "sharpness", "threshold", "ratio",
                                             "preconditioned_sharpness", "gradient_share")}
    out["tol"] = monitors["warm"].tol
    return out


def table(rows: list[dict]) -> str:
    """The README's table."""
    lines = ["| setting | parameters | records | products a record, warm (median / mean) | "
             "cold (median / mean) | the top eigenvalue's alone, warm / cold | seconds a "
             "record, warm | cold | a training step |", "|" + "---|" * 9]
    for r in rows:
        w, c = r["warm"], r["cold"]
        lines.append(
            f"| {r['setting']} | {r['parameters']:,} | {r['records']} | "
            f"{w['median_hvp']:g} / {w['mean_hvp']:.1f} | {c['median_hvp']:g} / "
            f"{c['mean_hvp']:.1f} | {w['median_hvp_sharpness']:g} / "
            f"{c['median_hvp_sharpness']:g} | {w['median_seconds'] * 1e3:.0f} ms | "
            f"{c['median_seconds'] * 1e3:.0f} ms | {r['train_step_seconds'] * 1e3:.1f} ms |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    plan = [("mlp-gd", 300, 5), ("mlp-sgd", 300, 10), ("cnn1d-sgd", 300, 10),
            ("gpt-nano-adamw", 200, 10)]
    if args.quick:
        plan = [(n, s // 3, e) for n, s, e in plan]
    rows = []
    for name, steps, every in plan:
        rows.append(run(name, steps, every))
        print(f"{name}: warm {rows[-1]['warm']['median_hvp']:g}, cold "
              f"{rows[-1]['cold']['median_hvp']:g} products a record", flush=True)
    print(table(rows))
    write_results(args.out, {"benchmark": "sharpness", "quick": args.quick,
                             "load_average": os.getloadavg(), "rows": rows})


if __name__ == "__main__":
    main()
