"""``hesslens compare``: arms from configs, mean ± std over seeds, files and figures."""

from __future__ import annotations

import argparse
import csv
import json
import math

import pytest
import torch

from hesslens.errors import HesslensInputError
from hesslens.experiments.compare import add_compare_arguments, compare_runs, run_compare
from hesslens.training.config import TrainConfig


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _write_run(path, seed, acc_final, trace_final=None, seconds=0.5, **cfg):
    config = TrainConfig(epochs=3, seed=seed, **cfg).to_dict()
    epochs = []
    for e in (1, 2, 3):
        rec = {"epoch": e, "test_acc": acc_final - 0.1 * (3 - e), "epoch_seconds": seconds,
               "train_loss": 1.0 / e}
        if trace_final is not None and e in (2, 3):
            rec["trace"] = trace_final * (1 + 0.5 * (3 - e))
            rec["top_eigenvalue"] = trace_final / 10
        epochs.append(rec)
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({"config": config, "epochs": epochs}))
    return path


def _args(runs, out, *extra):
    parser = argparse.ArgumentParser()
    add_compare_arguments(parser)
    return parser.parse_args([*map(str, runs), "--out", str(out), *extra])


def test_groups_by_config_and_averages_over_seeds(tmp_path, capsys):
    runs = [
        _write_run(tmp_path / "sgd0", 0, 0.80, 10.0),
        _write_run(tmp_path / "sgd1", 1, 0.84, 14.0),
        _write_run(tmp_path / "htr0", 0, 0.86, 6.0, seconds=1.5, htr_gamma=1e-3,
                   htr_layers="middle"),
        _write_run(tmp_path / "htr1", 1, 0.88, 8.0, seconds=1.5, htr_gamma=1e-3,
                   htr_layers="middle"),
        _write_run(tmp_path / "htr2", 2, 0.90, 7.0, seconds=1.5, htr_gamma=1e-3,
                   htr_layers="middle"),
    ]
    out = tmp_path / "cmp"
    assert run_compare(_args(runs, out)) == 0
    table = capsys.readouterr().out
    assert "SGD+HTR(1e-03, middle, hvp, every 1)" in table and "82.00 ± 2.83" in table
    res = json.loads((out / "compare.json").read_text())
    arms = {a["label"]: a for a in res["arms"]}
    assert set(arms) == {"SGD", "SGD+HTR(1e-03, middle, hvp, every 1)"}
    sgd, htr = arms["SGD"], arms["SGD+HTR(1e-03, middle, hvp, every 1)"]
    assert sgd["n_seeds"] == 2 and htr["n_seeds"] == 3
    assert sgd["final"]["test_acc"]["mean"] == pytest.approx(0.82)
    assert sgd["final"]["test_acc"]["std"] == pytest.approx(math.sqrt(2) * 0.02)
    assert htr["final"]["trace"]["mean"] == pytest.approx(7.0)
    assert htr["final"]["top_eigenvalue"]["mean"] == pytest.approx(0.7)
    assert htr["cost_vs_sgd"] == pytest.approx(3.0)  # 1.5 s per epoch against 0.5 s
    assert sgd["cost_vs_sgd"] == pytest.approx(1.0)
    assert sgd["curves"]["test_acc"]["epochs"] == [1, 2, 3]
    assert sgd["curves"]["trace"]["epochs"] == [2, 3]
    with (out / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["arm"] == "SGD" and len(rows) == 2
    for name in ("test_accuracy.png", "trace.png", "top_eigenvalue.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert any("one seed" in n for n in res["notes"]) is False


def test_unequal_budgets_are_flagged_and_labelled(tmp_path, capsys):
    a = _write_run(tmp_path / "a", 0, 0.8, batch_size=64)
    b = _write_run(tmp_path / "b", 0, 0.8, batch_size=128)
    res = compare_runs([str(a), str(b)])
    labels = sorted(x["label"] for x in res["arms"])
    assert labels == ["SGD [batch_size=128]", "SGD [batch_size=64]"]
    assert any("equal budget" in n for n in res["notes"])
    assert any("one seed" in n for n in res["notes"])
    # no tracking: no curvature figures, but the accuracy one
    out = tmp_path / "o"
    run_compare(_args([a, b], out))
    assert (out / "test_accuracy.png").exists() and not (out / "trace.png").exists()
    assert "note:" in capsys.readouterr().out


def test_parent_folder_expands_to_its_runs(tmp_path):
    _write_run(tmp_path / "runs" / "s0", 0, 0.7)
    _write_run(tmp_path / "runs" / "s1", 1, 0.9)
    res = compare_runs([str(tmp_path / "runs")])
    assert res["n_runs"] == 2 and res["arms"][0]["n_seeds"] == 2


def test_bad_input(tmp_path):
    with pytest.raises(HesslensInputError, match="does not exist"):
        compare_runs([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(HesslensInputError, match=r"no metrics\.json"):
        compare_runs([str(tmp_path / "empty")])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_text("{not json")
    with pytest.raises(HesslensInputError, match="JSON"):
        compare_runs([str(bad)])
    (bad / "metrics.json").write_text(json.dumps({"config": {}, "epochs": []}))
    with pytest.raises(HesslensInputError, match="no completed epoch"):
        compare_runs([str(bad)])
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(HesslensInputError, match="not a folder"):
        compare_runs([str(f)])


def test_end_to_end_with_real_runs(tmp_path, capsys):
    from hesslens.training import TensorData, train

    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 5, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    data = TensorData(x[:64], y[:64], x[64:], y[64:], num_classes=2)
    dirs = []
    for arm in ({}, {"sam_rho": 0.05}):
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(),
                                        torch.nn.Linear(8, 2))
            d = tmp_path / f"{len(arm)}_{seed}"
            train(TrainConfig(epochs=2, batch_size=16, lr=0.1, seed=seed, **arm), d,
                  progress=False, model=model, dataset=data)
            dirs.append(d)
    assert run_compare(_args(dirs, tmp_path / "cmp", "--no-figures")) == 0
    res = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert sorted(a["label"] for a in res["arms"]) == ["SAM(0.05)", "SGD"]
    assert all(a["n_seeds"] == 2 for a in res["arms"])
    assert not list((tmp_path / "cmp").glob("*.png"))


def test_unfinished_runs_are_marked_incomplete(tmp_path):
    done = _write_run(tmp_path / "a", 0, 0.8, 5.0)
    cut = _write_run(tmp_path / "b", 1, 0.8, 5.0)
    metrics = json.loads((cut / "metrics.json").read_text())
    metrics["epochs"] = metrics["epochs"][:2]  # killed after 2 of 3 epochs
    (cut / "metrics.json").write_text(json.dumps(metrics))
    res = compare_runs([str(done), str(cut)])
    (arm,) = res["arms"]
    assert arm["complete"] is False
    assert compare_runs([str(done)])["arms"][0]["complete"] is True


def _with_data(path, sha):
    doc = json.loads((path / "metrics.json").read_text())
    doc["data"] = {"name": "mnist1d", "sizes": {"x_train": [4000, 1, 40]}, "sha256": sha}
    (path / "metrics.json").write_text(json.dumps(doc))
    return path


def test_records_the_runs_data_and_flags_runs_on_other_data(tmp_path):
    from hesslens.experiments.compare import compare_runs

    a = _with_data(_write_run(tmp_path / "a", 0, 0.8), "1" * 64)
    b = _with_data(_write_run(tmp_path / "b", 1, 0.8), "1" * 64)
    same = compare_runs([str(a), str(b)])
    assert [(d["sha256"], len(d["runs"])) for d in same["data"]] == [("1" * 64, 2)]
    assert not any("data" in n for n in same["notes"])
    assert same["versions"]["torch"] == torch.__version__
    c = _with_data(_write_run(tmp_path / "c", 2, 0.8), "2" * 64)
    mixed = compare_runs([str(a), str(b), str(c)])
    assert sorted(len(d["runs"]) for d in mixed["data"]) == [1, 2]
    assert any("different data" in n for n in mixed["notes"])
    old = _write_run(tmp_path / "old", 3, 0.8)  # written before runs recorded their data
    assert any("no data fingerprint" in n for n in compare_runs([str(a), str(old)])["notes"])
