"""Cost of one penalised training step per curvature, relative to one plain SGD step.

Arms: SGD; HessianTracePenalty(curvature=...) on all layers, one probe: "hessian" (double
backward), "gauss_newton" (output-space forms, the cross-entropy closed form),
"gauss_newton general" (the same loss behind a wrapper: parameter-space forms), "fisher"
(exact, per-sample gradients). A step is ``zero_grad``, forward, loss (+ 1e-3 * penalty),
backward, SGD step at learning rate 0 (every step times the same point). The arms run
round-robin, ``--steps`` per arm per round; an arm's cost is the median over rounds of its mean
step time.

Usage::

    python benchmarks/bench_penalty_curvature.py --threads 1 --rounds 10 --steps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from hesslens import zoo
from hesslens.files import write_json
from hesslens.training import HessianTracePenalty

CE = nn.functional.cross_entropy
ARMS = {"SGD": None, "hessian": ("hessian", CE), "gauss_newton": ("gauss_newton", CE),
        "gauss_newton general": ("gauss_newton", lambda z, y: CE(z, y)),
        "fisher": ("fisher", CE)}


def _step(model_name: str, arm: str, x: torch.Tensor, y: torch.Tensor, shape, classes):
    model = zoo.build_model(model_name, shape, classes, seed=0).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    spec = ARMS[arm]
    pen = None if spec is None else HessianTracePenalty(model, curvature=spec[0],
                                                        loss_fn=spec[1], seed=0)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = CE(model(x), y)
        total = loss if pen is None else loss + 1e-3 * pen(loss, inputs=x, targets=y)
        total.backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="steps per arm per round")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--models", default="cnn1d,mlp")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = zoo.load_dataset("mnist1d")
    x, y = ds.x_train[:args.batch].clone(), ds.y_train[:args.batch].clone()
    results = {}
    for model_name in args.models.split(","):
        fns = {arm: _step(model_name, arm, x, y, ds.input_shape, ds.num_classes)
               for arm in ARMS}
        for fn in fns.values():
            fn()
        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for _ in range(args.rounds):
            for arm, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                times[arm].append((time.perf_counter() - t0) / args.steps)
        med = {arm: statistics.median(t) for arm, t in times.items()}
        results[model_name] = {arm: {"seconds_per_step": med[arm],
                                     "ratio_vs_sgd": med[arm] / med["SGD"]} for arm in ARMS}
        print(model_name, "  ".join(f"{arm}: {med[arm] * 1e3:.1f} ms ({med[arm] / med['SGD']:.1f}x)"
                                    for arm in ARMS))
    if args.out:
        write_json(Path(args.out), {"batch": args.batch, "threads": args.threads,
                                    "rounds": args.rounds, "steps": args.steps,
                                    "models": results})
    else:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
