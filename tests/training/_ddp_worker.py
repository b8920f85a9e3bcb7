"""Run under ``python -m torch.distributed.run --nproc-per-node W`` (gloo, CPU) by
test_ddp_training.py, or alone (the single-process reference): trains every arm of ARMS on the
same float64 data with ``hesslens.training.train`` and writes, per rank, the final parameters
(``OUT/<arm>/rank<r>.pt``). With ``--kill-at E`` rank 0 kills itself (SIGKILL) after epoch E's
training, before that epoch's checkpoint; with ``--resume`` the run continues from the last
checkpoint.

Usage: _ddp_worker.py OUT [--arms a,b] [--kill-at E] [--resume] [--also OUT2]
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
from torch import nn

from hesslens.analysis.epoch_tracking import EpochTracking
from hesslens.parallel import current, process_group_from_env
from hesslens.training import TrainConfig, train
from hesslens.training.trainer import TensorData

# 46 training examples in batches of 15: pieces 8/7 (uneven, through DDP) three times and 1/0
# (a last batch that one rank has nothing of) on two ranks.
BASE = dict(epochs=2, batch_size=15, lr=0.05, momentum=0.9, val_fraction=0.0, seed=3,
            track_every=0, device="cpu")
ARMS: dict[str, dict] = {
    "sgd": {},
    "l2": {"weight_decay": 5e-3},
    "sam": {"sam_rho": 0.05},
    "htr_hvp_all": {"htr_gamma": 1e-2, "htr_layers": "all"},
    "htr_hvp_middle_every2": {"htr_gamma": 1e-2, "htr_layers": "middle", "htr_every": 2},
    "htr_fd_middle": {"htr_gamma": 1e-2, "htr_layers": "middle", "htr_method": "fd",
                      "htr_fd_eps": 1e-3},
    "htr_fd_named": {"htr_gamma": 1e-2, "htr_layers": ["0", "4"], "htr_method": "fd",
                     "htr_fd_eps": 1e-3},
    "sam_htr": {"sam_rho": 0.05, "htr_gamma": 1e-2, "htr_layers": "middle"},
    "htr_fisher_middle": {"htr_gamma": 1e-2, "htr_layers": "middle", "htr_curvature": "fisher"},
    # output-space probes are drawn per rank's piece: equal to one process in expectation only
    "htr_gauss_newton": {"htr_gamma": 1e-2, "htr_curvature": "gauss_newton"},
    "tracked": {"track_every": 1, "track_per_class": 5},
    "resume": {"epochs": 3, "htr_gamma": 1e-2, "htr_layers": "middle", "htr_every": 2},
    # BatchNorm: each rank normalises with its piece (not one process's numbers); in sync
    "batchnorm": {"batch_size": 14, "htr_gamma": 1e-2, "htr_layers": "middle", "htr_every": 2,
                  "track_every": 1, "track_per_class": 5},
}


def data() -> TensorData:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(69, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 0.8).long()
    return TensorData(x[:46], y[:46], x[46:], y[46:], num_classes=3, name="ddp-test")


def model(batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(5)
    norm = [nn.BatchNorm1d(8)] if batchnorm else []
    return nn.Sequential(nn.Linear(5, 8), *norm, nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def run_arm(name: str, out: Path, kill_at: int | None, resume: bool) -> dict:
    config = TrainConfig(**{**BASE, **ARMS[name]})
    callbacks: list = [EpochTracking()] if config.track_every else []
    if kill_at is not None:
        def kill(epoch: int, record: dict, net: nn.Module) -> None:
            if epoch == kill_at and current().rank == 0:
                os.kill(os.getpid(), signal.SIGKILL)
        callbacks.append(kill)
    net = model(batchnorm=name == "batchnorm")
    result = train(config, out / name, progress=False, resume=resume, model=net,
                   dataset=data(), callbacks=callbacks)
    torch.save({"params": {k: v.detach().clone() for k, v in net.state_dict().items()},
                "epochs": result["epochs"], "parallel": result["parallel"]},
               out / name / f"rank{current().rank}.pt")
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--also", default=None, metavar="OUT2",
                   help="then train the same arms afresh (no kill, no resume) into OUT2")
    a = p.parse_args()
    torch.set_num_threads(1)
    with process_group_from_env("cpu"):
        for name in a.arms.split(","):
            run_arm(name, Path(a.out), a.kill_at, a.resume)
        if a.also:
            for name in a.arms.split(","):
                run_arm(name, Path(a.also), None, False)


if __name__ == "__main__":
    main()
