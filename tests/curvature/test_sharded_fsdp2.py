"""FSDP2 (fully_shard) models on 2 gloo CPU processes: ShardedHessian's finite-difference
products, top eigenvalue and quadratic forms equal the dense float64 Hessian of all the data
(uneven shards); the model's parameters are left as they were; the functional operators refuse
the sharded model by name."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from hesslens.curvature.sharded import check_not_fsdp2, is_fsdp2

WORKER = Path(__file__).with_name("_fsdp2_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(WORKER), str(out)], capture_output=True, text=True, env=env, timeout=240,
        check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_sharded_products_equal_the_dense_hessian_of_all_the_data(ranks):
    for r in ranks:
        assert r["num_samples"] == 15
        np.testing.assert_allclose(r["products"], r["dense_products"], rtol=1e-8, atol=1e-10)


def test_sharded_top_eigenvalue_and_quadratic_forms_equal_the_dense_ones(ranks):
    for r in ranks:
        assert r["top"] == pytest.approx(r["dense_top"], rel=1e-8)
        assert r["quad"] == pytest.approx(r["dense_quad"], rel=1e-8)
    for key in ("products", "top", "quad"):  # the sharded results (not the rank-local refs)
        assert ranks[0][key] == ranks[1][key]


def test_products_leave_the_sharded_parameters_unchanged(ranks):
    assert all(r["params_unchanged"] for r in ranks)


def test_the_functional_operators_refuse_an_fsdp2_model_by_name(ranks):
    for r in ranks:
        assert "FSDP2" in r["refused"] and "ShardedHessian" in r["refused"]
    assert not is_fsdp2(nn.Linear(2, 2))
    check_not_fsdp2(nn.Linear(2, 2))  # an ordinary model passes
