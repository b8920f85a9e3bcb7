"""``reproduce`` under torchrun (gloo, 2 CPU processes) on a tiny plan: the ranks split the
training runs, each run is trained once and alone (not data-parallel), rank 0 writes one report
that records the world size, the runs equal a single-process training of the same config, and
an error on one rank ends every rank with the same exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_reproduce_worker.py")


def torchrun(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(WORKER), str(out), *args], capture_output=True, text=True, env=env, timeout=600,
        check=False)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce-torchrun")
    done = torchrun(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_ranks_split_the_runs_and_rank_0_writes_one_report(study):
    out, done = study
    assert [(out / f"rc-{r}").read_text() for r in (0, 1)] == ["0", "0"]
    assert done.stdout.count("paper's findings") == 1  # rank 0 alone prints
    results = json.loads((out / "results.json").read_text())
    assert results["plan"]["world_size"] == 2
    assert json.loads((out / "plan.json").read_text())["world_size"] == 2
    assert set(results["arms"]) == {"SGD", "SGD+L2"}
    cost = json.loads((out / "cost.json").read_text())
    assert set(cost["arms"]) == {"SGD", "SGD+L2"} and cost["threads"] == 1
    runs = sorted(out.glob("tune/*/**/metrics.json")) + sorted(out.glob("runs/*/*/metrics.json"))
    assert len(runs) == 2 + 2 * 2 + 2 * 2  # SGD and L2 on 2 tuning seeds; 2 arms x 2 seeds
    for path in runs:  # every run trained by one rank alone, to the end
        metrics = json.loads(path.read_text())
        assert metrics.get("parallel", {"world_size": 1})["world_size"] == 1
        assert [e["epoch"] for e in metrics["epochs"]] == [1]


def test_runs_equal_a_single_process_training(study, tmp_path):
    from hesslens.experiments.train import train_zoo
    from hesslens.training import TrainConfig

    out, _ = study
    run = out / "runs" / "sgd-l2" / "seed1"
    config = json.loads((run / "config.json").read_text())
    alone = train_zoo(TrainConfig.from_dict(config), tmp_path / "alone", progress=False)
    held = json.loads((run / "metrics.json").read_text())["epochs"][-1]
    for key in ("train_loss", "test_loss", "test_acc"):
        assert held[key] == pytest.approx(alone["final"][key], rel=1e-6)


def test_an_error_on_rank_0_ends_every_rank_alike(study):
    out, _ = study
    done = torchrun(out, "2")  # another plan (2 epochs) in the same folder: refused
    assert done.returncode != 0
    assert [(out / f"rc-{r}").read_text() for r in (0, 1)] == ["2", "2"]
    assert done.stderr.count("holds a different study") == 2


def test_the_command_line_under_torchrun_refuses_a_bad_pair_on_every_rank(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "hesslens", "reproduce", "--quick", "--model", "alexnet", "--out",
         str(tmp_path / "x")], capture_output=True, text=True, env=env, timeout=300,
        check=False)
    assert done.returncode != 0
    lines = [ln for ln in done.stderr.splitlines() if "unknown model 'alexnet'" in ln]
    assert len(lines) == 2 and all(ln.startswith("hesslens reproduce: error:") for ln in lines)
    assert not (tmp_path / "x").exists()
