"""``hesslens train`` argument parsing and run (add_train_arguments / run_train)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from hesslens.errors import HesslensInputError
from hesslens.experiments.train import (
    add_train_arguments,
    config_from_args,
    run_train,
    tracking_callbacks,
    train_zoo,
    zoo_model_and_data,
)
from hesslens.training import TrainConfig, train
from hesslens.training.trainer import TIMING_KEYS


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="hesslens train")
    add_train_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_and_full_option_set(tmp_path):
    args = _parse(["--out", str(tmp_path)])
    cfg = config_from_args(args)
    assert (cfg.model, cfg.data, cfg.htr_gamma, cfg.sam_rho, cfg.track_every) == (
        "cnn1d", "mnist1d", 0.0, 0.0, 1)  # curvature tracked every epoch by default
    assert cfg.track_layers is False  # ... the sharpness; per layer with --track-layers
    assert config_from_args(_parse(["--out", "x", "--track-layers"])).track_layers is True
    args = _parse([
        "--model", "mlp", "--data", "digits", "--epochs", "4", "--batch-size", "32",
        "--lr", "0.1", "--momentum", "0.5", "--wd", "5e-4", "--schedule", "cosine",
        "--htr", "1e-3", "--htr-layers", "features.1,classifier", "--htr-every", "50",
        "--htr-start", "2", "--htr-probes", "3", "--htr-method", "fd", "--sam", "0.05",
        "--track-every", "2", "--out", str(tmp_path), "--seed", "7", "--device", "cpu",
        "--milestones", "2,3"])
    cfg = config_from_args(args)
    assert cfg.htr_layers == ["features.1", "classifier"]
    assert (cfg.weight_decay, cfg.schedule, cfg.htr_every, cfg.htr_start, cfg.htr_probes,
            cfg.htr_method, cfg.sam_rho, cfg.seed, cfg.milestones) == (
        5e-4, "cosine", 50, 2, 3, "fd", 0.05, 7, [2, 3])
    assert config_from_args(_parse(["--out", "x", "--htr-layers", "middle"])).htr_layers \
        == "middle"


@pytest.mark.parametrize("argv", [
    ["--epochs", "0"], ["--lr", "-1"], ["--schedule", "step"], ["--htr-method", "exact"],
    ["--batch-size", "x"], [],  # --out missing
])
def test_bad_arguments_exit_2(argv, capsys):
    if argv:
        argv = [*argv, "--out", "o"]
    with pytest.raises(SystemExit) as e:
        _parse(argv)
    assert e.value.code == 2


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        _parse(["--help"])
    assert e.value.code == 0
    assert "--htr-layers" in capsys.readouterr().out


def test_run_train_on_digits_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", "mlp", "--data", "digits", "--epochs", "2", "--batch-size", "64",
            "--lr", "0.05", "--htr", "1e-4", "--htr-layers", "middle", "--htr-every", "5",
            "--out", str(out), "--seed", "1", "--no-progress", "--track-layers"]
    assert run_train(_parse(argv)) == 0
    line = capsys.readouterr().out
    assert "test acc" in line and str(out) in line
    metrics = json.loads((out / "metrics.json").read_text())
    # --track-layers: initialisation and every epoch, full and per layer
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1, 2]
    for e in metrics["epochs"]:
        assert e["test_acc"] is not None and e["trace"] > 0 and e["top_eigenvalue"] > 0
        assert set(e["layer_trace"]) == set(e["layer_top_eigenvalue"]) and e["layer_trace"]
    cost = metrics["tracking"]
    assert f"curvature tracking {cost['seconds']:.2f} s (" in line and "training time" in line
    assert metrics["config"]["htr_layers"] == "middle"
    with pytest.raises(HesslensInputError, match="already holds"):
        run_train(_parse(argv))
    assert run_train(_parse([*argv, "--resume"])) == 0


def test_default_tracking_is_the_sharpness_against_the_threshold(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(_parse(["--model", "mlp", "--data", "digits", "--epochs", "2",
                             "--batch-size", "64", "--lr", "0.05", "--schedule", "none",
                             "--out", str(out), "--no-progress", "--seed", "1"])) == 0
    line = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    for e in metrics["epochs"]:
        assert e["sharpness"] > 0 and e["threshold"] == pytest.approx(2 * 1.9 / 0.05)
        assert e["sharpness_ratio"] == pytest.approx(e["sharpness"] / e["threshold"])
        assert 0 <= e["gradient_share"] <= 1 and e["directional_sharpness"] is not None
        assert "trace" not in e and "layer_trace" not in e
    assert metrics["epochs"][1]["sharpness_n_hvp"] < metrics["epochs"][0]["sharpness_n_hvp"]
    assert "sharpness" in line and "curvature tracking" in line
    assert metrics["tracking"]["seconds"] > 0


def test_track_every_0_switches_tracking_off(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(_parse(["--model", "mlp", "--data", "digits", "--epochs", "1",
                             "--track-every", "0", "--out", str(out), "--no-progress"])) == 0
    assert "tracking" not in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1]
    assert "trace" not in metrics["epochs"][0] and "tracking" not in metrics


def test_unknown_layer_and_model_are_input_errors(tmp_path):
    base = ["--data", "digits", "--epochs", "1", "--no-progress", "--seed", "0"]
    with pytest.raises(HesslensInputError, match="layer"):
        run_train(_parse([*base, "--model", "mlp", "--htr", "1e-3", "--htr-layers", "conv9",
                          "--out", str(tmp_path / "a")]))
    assert not (tmp_path / "a").exists()  # nothing left behind
    with pytest.raises(HesslensInputError, match="model"):
        run_train(_parse([*base, "--model", "alexnet", "--out", str(tmp_path / "b")]))
    with pytest.raises(HesslensInputError, match="htr-layers"):
        config_from_args(_parse(["--out", "o", "--htr-layers", ","]))


def test_command_line_errors_are_one_line_and_exit_2(tmp_path, capsys):
    from hesslens.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    for argv in (["train", "--model", "alexnet", "--epochs", "1", "--out", str(tmp_path / "a")],
                 ["train", "--model", "mlp", "--epochs", "1", "--out", str(blocker / "sub")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("hesslens") and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err


def _untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


class _Kill(Exception):
    pass


def test_train_zoo_is_the_trainer_on_the_zoo_objects_and_resumes_exactly(tmp_path):
    cfg = TrainConfig(model="mlp", data="digits", epochs=3, batch_size=128, lr=0.05, seed=2,
                      htr_gamma=1e-3, htr_every=3, track_every=2, track_per_class=2)
    whole = train_zoo(cfg, tmp_path / "whole", progress=False)
    model, data = zoo_model_and_data(cfg)
    direct = train(cfg, tmp_path / "direct", model=model, dataset=data, progress=False,
                   callbacks=tracking_callbacks(cfg))  # the tracking train_zoo wires
    assert _untimed(direct["epochs"]) == _untimed(whole["epochs"])

    def kill(epoch, record, net):
        if epoch == 2:
            raise _Kill

    with pytest.raises(_Kill):
        train_zoo(cfg, tmp_path / "cut", progress=False, callbacks=[kill])
    resumed = train_zoo(cfg, tmp_path / "cut", progress=False, resume=True)  # model rebuilt
    assert _untimed(resumed["epochs"]) == _untimed(whole["epochs"])
    assert [r["epoch"] for r in whole["epochs"]] == [0, 1, 2, 3]
    with pytest.raises(HesslensInputError, match="config must be a TrainConfig"):
        train_zoo({"model": "mlp"}, tmp_path / "bad")
