"""Cost of one training step per arm, relative to plain SGD.

Arms: SGD, SGD+L2 (weight decay), SAM (two forward-backward passes), HTR by double backward on
all layers and on the middle layers, HTR by finite differences (all layers); one probe each.
A step is ``zero_grad``, forward, loss (+ penalty), backward, optimizer step, on one mini-batch.
Models: the zoo's MNIST-1D MLP and 1-D CNN (three layers each, so "middle" is every layer there),
a deeper MNIST-1D MLP (four hidden layers: five layers, middle = 3), and LeNet-5 on synthetic
32x32 RGB inputs (five layers, middle = conv2, fc1, fc2).

The weights are held fixed (learning rate 0; every other operation of the step runs), so all
arms are timed at the same point. Timing: the arms run round-robin, ``--steps`` steps per arm
per round, ``--rounds`` rounds; the cost of an arm is the median over rounds of its mean step
time, so slow drifts of the machine load hit every arm alike. The amortised cost at the paper's
schedule (penalty on every 50th step) is ``(49 t_SGD + t_HTR) / 50``.

Targets reported against: HTR(hvp) <= 5x SGD, HTR(fd) <= 2.5x SGD, HTR middle <= 0.8x HTR all.

Usage::

    python benchmarks/bench_training.py                  # writes benchmarks/results/training.json
    python benchmarks/bench_training.py --quick --threads 1 --device cpu --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hesslens import zoo
from hesslens.files import write_text
from hesslens.training import SAM, HessianTracePenalty, bn_stats_frozen

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "training.json"
CE = nn.functional.cross_entropy
ARMS = ["SGD", "SGD+L2", "SAM", "HTR hvp all", "HTR hvp middle", "HTR fd all"]
TARGETS = {"HTR hvp all": 5.0, "HTR fd all": 2.5}
PAPER_EVERY = 50


def _setups(quick: bool) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    ds = zoo.load_dataset("mnist1d")
    out = []
    for name, model, kw in (
        ("MNIST-1D MLP", "mlp", {}),
        ("MNIST-1D CNN", "cnn1d", {}),
        ("MNIST-1D MLP-5", "mlp", {"hidden": (64, 64, 64, 64)}),
    ):
        out.append(dict(name=name, model=model, kw=kw, input_shape=ds.input_shape,
                        num_classes=ds.num_classes, x=ds.x_train[:128].clone(),
                        y=ds.y_train[:128].clone(), batch=128))
    if not quick:
        out.append(dict(name="LeNet-5 32x32 (synthetic)", model="lenet", kw={},
                        input_shape=(3, 32, 32), num_classes=10,
                        x=torch.randn(128, 3, 32, 32, generator=g),
                        y=torch.randint(0, 10, (128,), generator=g), batch=128))
    else:
        out.append(dict(name="LeNet-5 32x32 (synthetic)", model="lenet", kw={},
                        input_shape=(3, 32, 32), num_classes=10,
                        x=torch.randn(64, 3, 32, 32, generator=g),
                        y=torch.randint(0, 10, (64,), generator=g), batch=64))
    return out


def _make_step(arm: str, setup: dict[str, Any], device: torch.device):
    model = zoo.build_model(setup["model"], setup["input_shape"], setup["num_classes"], seed=0,
                            **setup["kw"]).to(device)
    model.train()
    x, y = setup["x"].to(device), setup["y"].to(device)
    # lr 0: every step times the same point (the cost does not depend on the weights, and the
    # finite-difference arm can diverge on ReLU networks when the weights do move).
    kw = dict(lr=0.0, momentum=0.9)
    if arm == "SAM":
        opt: torch.optim.Optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, **kw)
    else:
        opt = torch.optim.SGD(model.parameters(), weight_decay=5e-4 if arm == "SGD+L2" else 0,
                              **kw)
    pen = None
    if arm.startswith("HTR"):
        layers = "middle" if arm.endswith("middle") else "all"
        method = "fd" if " fd " in arm else "hvp"
        pen = HessianTracePenalty(model, layers=layers, method=method, seed=0, loss_fn=CE)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = CE(model(x), y)
        total = loss if pen is None else loss + 1e-3 * pen(loss, inputs=x, targets=y)
        total.backward()
        if isinstance(opt, SAM):
            opt.first_step(zero_grad=True)
            with bn_stats_frozen(model):
                CE(model(x), y).backward()
            opt.second_step(zero_grad=True)
        else:
            opt.step()

    info = {"layers": pen.layers if pen is not None else None}
    return step, info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_setup(setup: dict[str, Any], device: torch.device, steps: int, rounds: int,
                warmup: int) -> dict[str, Any]:
    fns = {}
    infos = {}
    for arm in ARMS:
        fns[arm], infos[arm] = _make_step(arm, setup, device)
        for _ in range(warmup):
            fns[arm]()
    _sync(device)
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for _ in range(rounds):
        for arm in ARMS:
            t0 = time.perf_counter()
            for _ in range(steps):
                fns[arm]()
            _sync(device)
            times[arm].append((time.perf_counter() - t0) / steps)
    med = {arm: statistics.median(v) for arm, v in times.items()}
    base = med["SGD"]
    arms = {}
    for arm in ARMS:
        q = sorted(times[arm])
        arms[arm] = {
            "seconds_per_step": med[arm],
            "ratio_vs_sgd": med[arm] / base,
            "iqr_seconds": [q[len(q) // 4], q[(3 * len(q)) // 4]],
            "layers": infos[arm]["layers"],
        }
        if arm.startswith("HTR"):
            arms[arm]["amortised_ratio_every_50"] = (
                (PAPER_EVERY - 1) * base + med[arm]) / PAPER_EVERY / base
    middle_vs_all = med["HTR hvp middle"] / med["HTR hvp all"]
    n_layers = len(infos["HTR hvp all"]["layers"])
    return {
        "name": setup["name"],
        "batch_size": setup["batch"],
        "n_layers": n_layers,
        "middle_layers": infos["HTR hvp middle"]["layers"],
        "arms": arms,
        "middle_vs_all": middle_vs_all,
        "targets": {
            "htr_hvp_le_5x": arms["HTR hvp all"]["ratio_vs_sgd"] <= TARGETS["HTR hvp all"],
            "htr_fd_le_2.5x": arms["HTR fd all"]["ratio_vs_sgd"] <= TARGETS["HTR fd all"],
            "middle_le_0.8x_all": (middle_vs_all <= 0.8) if n_layers > 3 else None,
        },
    }


def _table(results: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    head = f"{'model':<28}" + "".join(f"{a:>16}" for a in ARMS) + f"{'mid/all':>9}"
    buf.write(head + "\n" + "-" * len(head) + "\n")
    for r in results:
        sgd_ms = r["arms"]["SGD"]["seconds_per_step"] * 1e3
        row = f"{r['name']:<28}"
        for a in ARMS:
            if a == "SGD":
                row += f"{f'{sgd_ms:.2f} ms':>16}"
            else:
                row += f"{r['arms'][a]['ratio_vs_sgd']:>15.2f}x"
        row += f"{r['middle_vs_all']:>9.2f}"
        buf.write(row + "\n")
    buf.write("\namortised at the paper's schedule (penalty every 50th step), x SGD:\n")
    for r in results:
        am = {a: r["arms"][a]["amortised_ratio_every_50"] for a in ARMS if a.startswith("HTR")}
        buf.write(f"  {r['name']:<28}" + "  ".join(f"{a}: {v:.3f}" for a, v in am.items())
                  + "\n")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--steps", type=int, default=5, help="steps per arm per round")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="fewer rounds, smaller LeNet batch")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.quick:
        args.rounds, args.steps = min(args.rounds, 5), min(args.steps, 3)
    results = []
    for setup in _setups(args.quick):
        r = bench_setup(setup, device, args.steps, args.rounds, args.warmup)
        results.append(r)
        print(f"done {r['name']}", file=sys.stderr, flush=True)
    print(_table(results))
    payload = {
        "benchmark": "training step cost per arm relative to SGD",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()}), "
                        f"{args.threads} thread(s)"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "settings": {"steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
                     "probes": 1, "quick": args.quick},
        "targets": {"htr_hvp_vs_sgd": 5.0, "htr_fd_vs_sgd": 2.5, "middle_vs_all": 0.8},
        "results": results,
    }
    write_text(Path(args.out), json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
