"""The sharpness monitor under torch.distributed (gloo, 2 CPU processes started by torchrun):
the same records on every rank, equal to one process on all the data; rank 0 alone writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("_sharpness_worker.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharpness_dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", "29547", str(WORKER), str(out)],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_every_rank_records_the_same(run):
    _, (a, b) = run
    assert a["shard"] == b["shard"]
    assert [r["step"] for r in a["shard"]] == [0, 2, 4]


def test_the_sharded_records_are_those_of_all_the_data(run):
    _, ranks = run
    for r in ranks:
        for s, w in zip(r["shard"], r["whole"]):
            for key in ("eigenvalues", "sharpness", "preconditioned_sharpness", "threshold",
                        "directional_sharpness", "gradient_share", "loss"):
                if w[key] is None:
                    assert s[key] is None, key
                else:
                    np.testing.assert_allclose(s[key], w[key], rtol=1e-7, err_msg=key)


def test_rank_zero_alone_writes(run):
    out, _ = run
    saved = json.loads((out / "monitor0" / "sharpness.json").read_text())
    assert [r["step"] for r in saved["records"]] == [0, 2, 4]
    assert not (out / "monitor1").exists()
