"""The edge-of-stability setting of ``hesslens reproduce`` (beyond the paper): full-batch gradient
descent at a few learning rates and full-batch Adam on an MNIST-1D subset, the sharpness
recorded by :class:`hesslens.SharpnessMonitor` (Cohen et al. 2021, 2022), and its figure.

The network is a tanh MLP (two hidden layers) on the flattened signals, trained on the square
loss ``½ |f(x) - onehot(y)|²`` averaged over the subset (the loss on which Cohen et al. see the
edge of stability most cleanly); every run starts from the same weights. Each record keeps the
sharpness, the threshold (``2 / lr``; Adam: ``38 / lr`` for its preconditioned sharpness), their
ratio, the directional sharpness along the step and the loss.

Example:
    >>> from hesslens.experiments.reproduce_plan import EdgeOfStability
    >>> res = run_edge_of_stability(EdgeOfStability(per_class=2, width=8, gd=((0.5, 20),),
    ...                                             adam=(), every=10))
    >>> [(r["optimizer"], r["lr"], [x["step"] for x in r["records"]]) for r in res["runs"]]
    [('SGD', 0.5, [0, 10])]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hesslens import zoo
from hesslens.experiments.reproduce_plan import EdgeOfStability
from hesslens.report.html import Paragraph
from hesslens.report.sharpness import SharpnessMonitor
from hesslens.report.style import COLORS, new_figure, save_png

__all__ = ["KEYS", "edge_figure", "edge_section", "run_edge_of_stability"]

#: What each record keeps.
KEYS = ("step", "sharpness", "preconditioned_sharpness", "threshold", "ratio",
        "directional_sharpness", "loss", "n_hvp")


def _half_sse(out: Any, target: Any) -> Any:
    return 0.5 * ((out - target) ** 2).sum(1).mean()


def _run(eos: EdgeOfStability, optimizer: str, lr: float, steps: int, x: Any, target: Any,
         device: str) -> dict[str, Any]:
    torch.manual_seed(eos.seed)
    model = nn.Sequential(nn.Linear(x.shape[1], eos.width), nn.Tanh(),
                          nn.Linear(eos.width, eos.width), nn.Tanh(),
                          nn.Linear(eos.width, target.shape[1])).to(device)
    opt = (torch.optim.SGD(model.parameters(), lr=lr) if optimizer == "SGD"
           else torch.optim.Adam(model.parameters(), lr=lr))
    mon = SharpnessMonitor(model, _half_sse, (x, target), opt, every=eos.every)
    t0 = time.perf_counter()
    for step in range(steps):
        opt.zero_grad()
        _half_sse(model(x), target).backward()
        opt.step()
        mon.update(step)
    mon.close()
    return {"optimizer": optimizer, "lr": lr, "steps": steps,
            "compared": mon.history[-1]["compared"], "seconds": time.perf_counter() - t0,
            "records": [{k: r.get(k) for k in KEYS} for r in mon.history]}


def run_edge_of_stability(eos: EdgeOfStability, device: str = "cpu") -> dict[str, Any]:
    """Every run of ``eos``: ``{"setting": {...}, "runs": [{"optimizer", "lr", "steps",
    "compared", "seconds", "records": [...]}]}``."""
    ds = zoo.load_dataset("mnist1d")
    x, y = zoo.analysis_subset(*ds.train, per_class=eos.per_class, seed=0)
    x = x.reshape(len(x), -1).to(device)
    target = nn.functional.one_hot(y, ds.num_classes).float().to(device)
    runs = [_run(eos, "SGD", lr, steps, x, target, device) for lr, steps in eos.gd]
    runs += [_run(eos, "Adam", lr, steps, x, target, device) for lr, steps in eos.adam]
    setting = {"data": f"mnist1d, {len(y)} training examples ({eos.per_class} per class), "
                       "flattened", "model": f"MLP {x.shape[1]}-{eos.width}-{eos.width}-"
                                             f"{ds.num_classes}, tanh",
               "loss": "square loss 1/2 |f(x) - onehot(y)|^2, mean over the examples",
               "every": eos.every, "band": list(eos.band), "seed": eos.seed}
    return {"setting": setting, "runs": runs}


def edge_figure(result: dict[str, Any], path: str | Path) -> Path:
    """The sharpness of every run over its steps against its threshold (log scale): one panel
    for gradient descent, one for Adam's preconditioned sharpness."""
    runs = result["runs"]
    groups = [(name, [r for r in runs if r["optimizer"] == name]) for name in ("SGD", "Adam")]
    groups = [(n, rs) for n, rs in groups if rs]
    fig = new_figure(4.8 * len(groups), 3.5)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (name, rs) in zip(axes, groups):
        for i, r in enumerate(rs):
            steps = [x["step"] for x in r["records"]]
            key = "sharpness" if r["compared"] == "sharpness" else "preconditioned_sharpness"
            values = np.array([np.nan if x[key] is None else x[key] for x in r["records"]])
            color = COLORS[i % len(COLORS)]
            ax.plot(steps, values, color=color, lw=1.2, label=f"lr {r['lr']:g}")
            ax.axhline(r["records"][-1]["threshold"], color=color, ls="--", lw=1.0)
        ax.set_yscale("log")
        ax.set_xlabel("step", fontsize=9)
        ax.set_title("Gradient descent: sharpness against 2/lr (dashed)" if name == "SGD"
                     else r"Adam: $\lambda_1(P^{-1}H)$ against 38/lr (dashed)", fontsize=10)
        ax.grid(alpha=0.3, lw=0.5)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=8, frameon=False)
    return save_png(fig, path)


def edge_section(result: dict[str, Any], figures_dir: str | Path) -> tuple[Any, Path, str]:
    """The report's blocks for the setting: what was run (a paragraph), the figure drawn into
    ``figures_dir`` and its caption."""
    s = result.get("setting", {})
    png = edge_figure(result, Path(figures_dir) / "edge_of_stability.png")
    runs = ", ".join(f"{r['optimizer']} lr {r['lr']:g} ({r['steps']} steps, "
                     f"{r['seconds']:.1f} s)" for r in result["runs"])
    paragraph = Paragraph(
        f"Cohen et al. (2021) found that full-batch gradient descent sharpens until the top "
        f"Hessian eigenvalue reaches 2/lr and then hovers there, and (2022) that full-batch "
        f"Adam's preconditioned sharpness does the same at 38/lr. Here: {s.get('model')} on "
        f"{s.get('data')}, {s.get('loss')}, every run from the same weights (seed "
        f"{s.get('seed')}); hl.SharpnessMonitor records every {s.get('every')} steps: {runs}.")
    return paragraph, png, ("Sharpness (gradient descent) and preconditioned sharpness (Adam) "
                            "over the steps, each learning rate against its own threshold "
                            "(dashed), log scale.")
