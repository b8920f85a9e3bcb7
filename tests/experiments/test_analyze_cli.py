"""``hesslens analyze`` end to end: the files it writes, and bad input -> exit code 2 with one
line on stderr."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from hesslens import cli, zoo
from hesslens.errors import HesslensInputError
from hesslens.experiments.common import load_state_dict, resolve_device

# small estimator settings: the defaults are measured in the report, not here
FAST = ["--quiet", "--threads", "1", "--k", "3", "--density-steps", "30",
        "--trace-max-hvp", "200", "--per-class", "5"]


@pytest.fixture(autouse=True)
def only_analyze(monkeypatch):
    """Build the parser with the analyze subcommand alone (the others may be in progress)."""
    monkeypatch.setattr(cli, "COMMANDS", {"analyze": cli.COMMANDS["analyze"]})
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _run(capsys, *argv):
    code = cli.main(["analyze", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hesslens analyze: error: ")
    return lines[0]


def test_analyze_writes_all_files(tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = _run(capsys, "--model", "mlp", "--data", "digits", "--out", str(out_dir),
                          *FAST)
    assert code == 0, err
    names = {p.name for p in out_dir.iterdir()}
    assert {"results.json", "layers.csv", "report.html", "densities.png",
            "similarity_depth.png", "layer_curvature.png", "gauss_newton.png"} <= names
    r = json.loads((out_dir / "results.json").read_text())
    assert r["run"]["model"] == "mlp" and r["run"]["data"] == "digits"
    assert r["run"]["num_samples"] == 50 and r["seed"] == 0
    assert {"torch", "numpy", "hesslens", "python"} <= set(r["versions"])
    assert r["versions"]["device"] == "cpu"
    from hesslens.provenance import data_fingerprint, dataset_fingerprint
    from hesslens.zoo import analysis_subset, load_dataset

    digits = load_dataset("digits", seed=0)
    x, y = analysis_subset(*digits.train, per_class=5, seed=0)
    assert r["data"] == {**dataset_fingerprint(digits, "digits"),
                         "analysis_subset": data_fingerprint("digits analysis subset",
                                                             {"x": x, "y": y})}
    assert r["data"]["sizes"]["x_train"] == [1437, 1, 8, 8]
    assert list(r["layers"]) == ["features.1", "features.3", "classifier"]
    full = r["full"]["top_eigenvalues"]
    for e in r["layers"].values():
        assert all(b <= f + 1e-6 * abs(f) for b, f in zip(e["top_eigenvalues"], full))
        assert e["similarity"]["wasserstein"] >= 0 and e["gauss_newton"]["gn"]
        assert abs(sum(e["density"]["weights"]) - 1) < 1e-9
    assert sum(e["trace"]["value"] for e in r["layers"].values()) == pytest.approx(
        r["full"]["trace"]["value"], rel=1e-9)
    rows = list(csv.DictReader((out_dir / "layers.csv").open()))
    assert [row["name"] for row in rows] == ["full", "features.1", "features.3", "classifier"]
    html = (out_dir / "report.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == 4
    assert "features.3" in out and "most similar" in out  # the table on stdout


def test_analyze_a_trainer_checkpoint(tmp_path, capsys):
    ds = zoo.load_dataset("digits")
    model = zoo.build_model("mlp", ds.input_shape, ds.num_classes, seed=7)
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": {"model": "mlp", "data": "digits",
                                                        "seed": 0}, "epoch": 3}, ckpt)
    code, _, err = _run(capsys, "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"),
                        "--quiet", "--threads", "1", "--no-gauss-newton", "--k", "1",
                        "--density-probes", "1", "--density-steps", "8", "--trace-max-hvp",
                        "100", "--per-class", "2")
    assert code == 0, err
    r = json.loads((tmp_path / "o" / "results.json").read_text())
    assert r["run"]["model"] == "mlp" and r["run"]["data"] == "digits"  # from the checkpoint
    assert r["run"]["checkpoint_epoch"] == 3 and r["full"]["gauss_newton"] is None


def test_checkpoint_formats(tmp_path):
    sd = torch.nn.Linear(2, 3).state_dict()
    torch.save(sd, tmp_path / "plain.pt")
    torch.save({"model": sd, "optimizer": {}}, tmp_path / "wrapped.pt")
    for name in ("plain.pt", "wrapped.pt"):
        state, _ = load_state_dict(tmp_path / name)
        assert set(state) == {"weight", "bias"}
    torch.save({"weights": [1, 2]}, tmp_path / "other.pt")
    with pytest.raises(HesslensInputError, match="state_dict"):
        load_state_dict(tmp_path / "other.pt")


@pytest.mark.parametrize("argv, message", [
    (["--model", "alexnet", "--data", "digits"], "unknown model 'alexnet'"),
    (["--model", "mlp", "--data", "imagenet"], "unknown data set 'imagenet'"),
    (["--model", "lenet", "--data", "mnist"], "mnist"),
    (["--model", "lenet", "--data", "mnist", "--data-root", "/nonexistent/folder"], "mnist"),
    (["--model", "lenet", "--data", "mnist1d"], "lenet"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    code, _, err = _run(capsys, *argv, "--out", str(tmp_path / "o"), "--quiet")
    assert code == 2
    assert message in _one_error_line(err)


def test_checkpoint_that_does_not_fit(tmp_path, capsys):
    other = zoo.build_model("mlp", (1, 40), 10)  # an MNIST-1D model: wrong input size
    torch.save(other.state_dict(), tmp_path / "wrong.pt")
    code, _, err = _run(capsys, "--model", "mlp", "--data", "digits", "--checkpoint",
                        str(tmp_path / "wrong.pt"), "--out", str(tmp_path / "o"), "--quiet")
    assert code == 2
    line = _one_error_line(err)
    assert "does not fit model 'mlp'" in line and "size mismatch" in line

    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    code, _, err = _run(capsys, "--model", "mlp", "--data", "digits", "--checkpoint",
                        str(tmp_path / "junk.pt"), "--out", str(tmp_path / "o"), "--quiet")
    assert code == 2 and "cannot read checkpoint" in _one_error_line(err)

    code, _, err = _run(capsys, "--model", "mlp", "--data", "digits", "--checkpoint",
                        str(tmp_path / "missing.pt"), "--quiet")
    assert code == 2 and "does not exist" in _one_error_line(err)


def test_devices(capsys, tmp_path):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(HesslensInputError, match="unknown device"):
        resolve_device("tpu:0")
    if not torch.cuda.is_available():
        code, _, err = _run(capsys, "--model", "mlp", "--data", "digits", "--device", "cuda",
                            "--out", str(tmp_path / "o"), "--quiet")
        assert code == 2 and "CUDA is not available" in _one_error_line(err)


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["analyze", "--k", "0"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["analyze", "--similarity-normalize", "median"])
    assert exc.value.code == 2
