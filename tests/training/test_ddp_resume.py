"""A torchrun training (gloo, 2 CPU processes, HTR every other step) killed during an epoch
resumes from rank 0's checkpoint on every rank and ends bit for bit where the uninterrupted
torchrun run ends."""

from __future__ import annotations

import torch

from tests.training.test_ddp_training import load, max_diff, torchrun

TIMINGS = {"epoch_seconds", "eval_seconds", "tracking_seconds"}


def test_a_killed_torchrun_training_resumes_to_the_uninterrupted_result(tmp_path):
    killed = torchrun(tmp_path / "run", "--arms", "resume", "--kill-at", "2")
    assert killed.returncode != 0  # rank 0 killed itself; torchrun stopped rank 1 (no hang)
    ckpt = torch.load(tmp_path / "run" / "resume" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1  # killed in epoch 2, before its checkpoint
    resumed = torchrun(tmp_path / "run", "--arms", "resume", "--resume",
                       "--also", str(tmp_path / "fresh"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in (0, 1):
        a, b = load(tmp_path / "run" / "resume", rank), load(tmp_path / "fresh" / "resume", rank)
        assert max_diff(a["params"], b["params"]) == 0.0  # bit for bit, on every rank
    assert len(a["epochs"]) == 3
    assert ([{k: v for k, v in r.items() if k not in TIMINGS} for r in a["epochs"]]
            == [{k: v for k, v in r.items() if k not in TIMINGS} for r in b["epochs"]])
