"""``hesslens train`` and ``hesslens analyze`` under torchrun (gloo, 2 CPU processes): one set of
results, written by rank 0, that records the world size and equals the single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hesslens.cli import main

TRAIN = ["train", "--model", "mlp", "--data", "mnist1d", "--htr", "1e-3", "--htr-layers",
         "middle", "--epochs", "1", "--batch-size", "250", "--track-every", "0", "--seed", "1",
         "--no-progress"]
ANALYZE = ["analyze", "--model", "mlp", "--data", "mnist1d", "--per-class", "2", "--k", "2",
           "--density-probes", "1", "--density-steps", "12", "--no-gauss-newton",
           "--trace-max-hvp", "62", "--dtype", "float64", "--quiet"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "hesslens", *args], capture_output=True, text=True, env=env, timeout=240,
        check=False)


def test_torchrun_train_writes_one_set_of_results_with_the_world_size(tmp_path):
    done = torchrun(*TRAIN, "--out", str(tmp_path / "ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and "2 processes" in lines[0]  # rank 0 alone prints
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "checkpoint.pt", "config.json", "metrics.csv", "metrics.json"]
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["parallel"] == {"world_size": 2, "backend": "gloo"}

    assert main([*TRAIN, "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert one["parallel"]["world_size"] == 1
    a, b = one["epochs"][-1], ddp["epochs"][-1]
    assert b["htr_steps"] == a["htr_steps"] > 0
    for key in ("test_loss", "val_loss", "train_loss", "htr_penalty"):
        assert b[key] == pytest.approx(a[key], rel=1e-4)  # float32, same global batches


def test_torchrun_analyze_equals_the_single_process_study(tmp_path):
    done = torchrun(*ANALYZE, "--out", str(tmp_path / "ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*ANALYZE, "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert ddp["run"]["parallel"] == {"world_size": 2, "backend": "gloo"}
    assert ddp["num_samples"] == one["num_samples"] == 20
    for name in ["full", *one["layers"]]:
        a = one["full"] if name == "full" else one["layers"][name]
        b = ddp["full"] if name == "full" else ddp["layers"][name]
        assert b["top_eigenvalues"] == pytest.approx(a["top_eigenvalues"], rel=1e-8)
        assert b["trace"]["value"] == pytest.approx(a["trace"]["value"], rel=1e-8)
        assert b["density"]["nodes"] == pytest.approx(a["density"]["nodes"], rel=1e-6,
                                                      abs=1e-9)

