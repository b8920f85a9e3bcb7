"""Data-parallel operators under torch.distributed (gloo, 2 CPU processes started by torchrun):
sharded products and estimators equal the single-process ones on all the data, on every rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("_distributed_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", "29533", str(WORKER), str(out)],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_sharded_operator_counts_every_sample(ranks):
    for r in ranks:
        assert r["world"] == 2
        assert r["shard"]["num_samples"] == r["whole"]["num_samples"] == 17


def test_sharded_products_equal_the_whole_data(ranks):
    for r in ranks:
        for key in ("products", "gn_products", "grad"):
            np.testing.assert_allclose(r["shard"][key], r["whole"][key], rtol=1e-10,
                                       atol=1e-12)
        assert abs(r["shard"]["loss"] - r["whole"]["loss"]) < 1e-12


def test_sharded_estimators_equal_the_whole_data(ranks):
    for r in ranks:
        s, w = r["shard"], r["whole"]
        np.testing.assert_allclose(s["top3"], w["top3"], rtol=1e-8)
        np.testing.assert_allclose(s["block_top"], w["block_top"], rtol=1e-8)
        np.testing.assert_allclose(s["trace"], w["trace"], rtol=1e-8)
        np.testing.assert_allclose(s["full_trace"], w["full_trace"], rtol=1e-8)
        for name, value in w["layer_traces"].items():
            np.testing.assert_allclose(s["layer_traces"][name], value, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(s["density_nodes"], w["density_nodes"], rtol=1e-6,
                                   atol=1e-10)


def test_every_rank_gets_the_same_result(ranks):
    a, b = ranks[0]["shard"], ranks[1]["shard"]
    assert a == b


def test_a_failure_on_one_rank_is_raised_on_every_rank(ranks):
    # rank 1 alone has the bad data: both ranks raise the same named error (none waits in an
    # all-reduce), and both go on to the same next product
    for r in ranks:
        f = r["failures"]
        assert f["construction"] == "DataChangedError"
        assert f["product"] == "DataChangedError"
        assert f["nan_loss"] == "HesslensInputError"
    assert ranks[0]["failures"]["after"] == ranks[1]["failures"]["after"]


def test_operators_do_not_keep_the_process_group_alive(ranks):
    # destroy_process_group() ends the group (its gloo threads joined) while operators that
    # used it still exist; one they kept would live into interpreter shutdown and could abort
    # the process there
    for r in ranks:
        assert r["threads_left"] == 0
