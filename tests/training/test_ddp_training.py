"""Data-parallel training under torchrun (gloo, 2 CPU processes): every arm's DDP run ends
where the single-process run on the same global batches ends (float64), the penalty's gradient
included (test_ddp_resume.py: a killed torchrun training resumes to the uninterrupted one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training import _ddp_worker as worker

WORKER = Path(__file__).with_name("_ddp_worker.py")
FD_ARMS = {"htr_fd_middle", "htr_fd_named"}
# Gauss-Newton's output-space probes are drawn for each rank's piece of the batch: the same
# penalty in expectation, not the same draw as one process (see the trainer's docstring)
EXPECTATION_ONLY = {"htr_gauss_newton", "batchnorm"}


def torchrun(out: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path.cwd() / "src"), str(Path.cwd()),
                                          os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         str(nproc), str(WORKER), str(out), *extra],
        capture_output=True, text=True, env=env, timeout=240, check=False)


def load(folder: Path, rank: int = 0) -> dict:
    return torch.load(folder / f"rank{rank}.pt", weights_only=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    for name in worker.ARMS:
        worker.run_arm(name, out, kill_at=None, resume=False)
    return out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    done = torchrun(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("arm", sorted(set(worker.ARMS) - EXPECTATION_ONLY))
def test_ddp_training_equals_the_single_process_run(single, ddp, arm):
    ref, got = load(single / arm), load(ddp / arm)
    # fd penalties divide gradient differences by eps^2 (~1e-8): rounding grows to ~1e-11
    tol = 1e-9 if arm in FD_ARMS else 1e-12
    assert max_diff(ref["params"], got["params"]) < tol
    if arm not in ("sgd", "tracked"):  # the arm changes the training
        assert max_diff(ref["params"], load(single / "sgd")["params"]) > 1e-4
    for r_ref, r_got in zip(ref["epochs"], got["epochs"], strict=True):
        if r_ref["epoch"] == 0:  # tracking's record at initialisation
            continue
        # the running train loss sums in float32 (as alone): rounding at 1e-7
        assert r_got["train_loss"] == pytest.approx(r_ref["train_loss"], rel=1e-6)
        assert r_got["test_loss"] == pytest.approx(r_ref["test_loss"], rel=tol)
        assert r_got["test_acc"] == r_ref["test_acc"]
        assert r_got["htr_steps"] == r_ref["htr_steps"]
        if r_ref["htr_penalty"] is not None:  # the weighted mean of the ranks' penalties
            rel = 1e-6 if arm in FD_ARMS else 1e-12
            assert r_got["htr_penalty"] == pytest.approx(r_ref["htr_penalty"], rel=rel)


def test_every_rank_ends_with_the_same_parameters(ddp):
    for arm in worker.ARMS:
        assert max_diff(load(ddp / arm, 0)["params"], load(ddp / arm, 1)["params"]) == 0.0


def test_batchnorm_runs_data_parallel_with_one_model_on_every_rank(single, ddp):
    # batch statistics of each rank's piece: close to one process, not equal; running
    # statistics broadcast from rank 0 (equal on both ranks: the test above)
    ref, got = load(single / "batchnorm"), load(ddp / "batchnorm")
    weights = {k: v for k, v in ref["params"].items() if "running" not in k and "num" not in k}
    assert 0 < max_diff(weights, got["params"]) < 0.05
    assert all(r["trace"] > 0 for r in got["epochs"])


def test_gauss_newton_penalty_runs_data_parallel(single, ddp):
    # other output-space probes than one process: close (a sanity bound), not equal
    ref, got = load(single / "htr_gauss_newton"), load(ddp / "htr_gauss_newton")
    assert 0 < max_diff(ref["params"], got["params"]) < 1e-2
    assert got["epochs"][-1]["htr_penalty"] > 0  # a Gauss-Newton trace is never negative


def test_data_parallel_tracking_equals_the_single_process_numbers(single, ddp):
    ref, got = load(single / "tracked")["epochs"], load(ddp / "tracked")["epochs"]
    assert [r["epoch"] for r in got] == [0, 1, 2]
    for r_ref, r_got in zip(ref, got, strict=True):
        for key in ("trace", "top_eigenvalue"):
            assert r_got[key] == pytest.approx(r_ref[key], rel=1e-8)
        for layer, value in r_ref["layer_trace"].items():
            assert r_got["layer_trace"][layer] == pytest.approx(value, rel=1e-8, abs=1e-12)


def test_rank_zero_writes_one_set_of_results_that_records_the_world_size(ddp):
    metrics = json.loads((ddp / "sgd" / "metrics.json").read_text())
    assert metrics["parallel"] == {"world_size": 2, "backend": "gloo"}
    assert len(metrics["epochs"]) == 2
    ckpt = torch.load(ddp / "sgd" / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2
    assert sorted(p.name for p in (ddp / "sgd").iterdir()) == [
        "checkpoint.pt", "config.json", "metrics.csv", "metrics.json", "rank0.pt", "rank1.pt"]

