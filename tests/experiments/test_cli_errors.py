"""Every command's bad input: exit code 2, exactly one line on stderr, no traceback, quickly.

One table of ``(argv, words the line must hold)`` over ``train``, ``analyze``, ``compare`` and
``reproduce``, run in-process through :func:`hesslens.cli.main`; two cases also run as
``python -m hesslens`` subprocesses. ``{tmp}`` in an argument is the case's folder, which holds
the fixtures below (a plain file, malformed and valid ``metrics.json`` runs, CIFAR-10 pickles
with string labels, a study folder of another plan).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from hesslens.cli import main

MALFORMED_RUNS = {
    "badjson": "{not json",
    "notobject": "[1, 2]",
    "nokeys": '{"config": {}}',
    "configstr": '{"config": "sgd", "epochs": [{"epoch": 1}]}',
    "epochsint": '{"config": {}, "epochs": 5}',
    "recordint": '{"config": {"model": "mlp"}, "epochs": [1, 2]}',
    "accstr": '{"config": {"model": "mlp"}, "epochs": [{"epoch": 1, "test_acc": "high"}]}',
    "noepoch": '{"config": {"model": "mlp"}, "epochs": [{"test_acc": 0.5}]}',
    "gammastr": '{"config": {"htr_gamma": "big"}, "epochs": [{"epoch": 1}]}',
    "empty": '{"config": {"model": "mlp"}, "epochs": []}',
}
VALID_RUN = {"config": {"model": "mlp", "data": "mnist1d", "seed": 0, "epochs": 1},
             "epochs": [{"epoch": 1, "test_acc": 0.5}]}


def _fixtures(tmp) -> None:
    (tmp / "file").write_text("not a folder\n")
    for name, text in MALFORMED_RUNS.items():
        (tmp / "runs" / name).mkdir(parents=True)
        (tmp / "runs" / name / "metrics.json").write_text(text)
    (tmp / "ok").mkdir()
    (tmp / "ok" / "metrics.json").write_text(json.dumps(VALID_RUN))
    (tmp / "nothing").mkdir()
    cifar = tmp / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": ["cat", "dog"]}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        (cifar / name).write_bytes(pickle.dumps(batch, protocol=2))
    (tmp / "study").mkdir()
    (tmp / "study" / "plan.json").write_text('{"name": "another study"}')


CASES = [
    # ---------------------------------------------------------------- analyze
    (["analyze", "--k", "1000000000", "--out", "{tmp}/o"], ["--k 1000000000", "at most"]),
    (["analyze", "--model", "nope"], ["unknown model 'nope'"]),
    (["analyze", "--data", "nope"], ["unknown data set 'nope'"]),
    (["analyze", "--out", ""], ["--out is empty"]),
    (["analyze", "--out", "  "], ["--out is empty"]),
    (["analyze", "--out", "{tmp}/file"], ["is a file"]),
    (["analyze", "--out", "{tmp}/file/sub"], ["cannot create the output folder"]),
    (["analyze", "--per-class", "0"], ["--per-class", "positive integer"]),
    (["analyze", "--device", "bogus"], ["unknown device 'bogus'"]),
    (["analyze", "--device", "cuda:99"], ["cuda:99"]),
    (["analyze", "--checkpoint", "{tmp}/file"], ["cannot read checkpoint"]),
    (["analyze", "--checkpoint", "{tmp}/missing.pt"], ["does not exist"]),
    (["analyze", "--model", "lenet", "--data", "mnist1d"], ["does not fit data set 'mnist1d'"]),
    (["analyze", "--model", "lenet", "--data", "mnist"], ["--data-root"]),
    (["analyze", "--model", "resnet20", "--data", "cifar10", "--data-root", "{tmp}/cifar",
      "--out", "{tmp}/o"], ["data_batch_1", "labels are strings", "'cat'"]),
    (["analyze", "--trace-max-hvp", "1"], ["--trace-max-hvp 1", "62"]),
    (["analyze", "--trace-rtol", "nan"], ["--trace-rtol"]),
    (["analyze", "--seed", "-1"], ["--seed", "non-negative"]),
    (["analyze", "--dtype", "float16"], ["--dtype", "float16"]),
    (["analyze", "--threads", "0"], ["--threads"]),
    # ---------------------------------------------------------------- train
    (["train", "--out", "{tmp}/t", "--epochs", "0"], ["--epochs", "'0'"]),
    (["train", "--out", "{tmp}/t", "--epochs", "-3"], ["--epochs", "'-3'"]),
    (["train", "--out", "{tmp}/t", "--model", "nope"], ["unknown model 'nope'"]),
    (["train", "--out", "{tmp}/t", "--data", "nope"], ["unknown data set 'nope'"]),
    (["train", "--out", ""], ["--out is empty"]),
    (["train"], ["--out"]),
    (["train", "--out", "{tmp}/file"], ["is a file"]),
    (["train", "--out", "{tmp}/file/sub"], ["cannot create the output folder"]),
    (["train", "--out", "{tmp}/t", "--device", "bogus"], ["bogus"]),
    (["train", "--out", "{tmp}/t", "--val-fraction", "2"], ["val_fraction"]),
    (["train", "--out", "{tmp}/t", "--lr", "nan"], ["--lr"]),
    (["train", "--out", "{tmp}/t", "--batch-size", "0"], ["--batch-size"]),
    (["train", "--out", "{tmp}/t", "--momentum", "-1"], ["--momentum"]),
    (["train", "--out", "{tmp}/t", "--milestones", "x"], ["--milestones"]),
    (["train", "--out", "{tmp}/t", "--epochs", "3", "--milestones", "100,200"],
     ["milestones [100, 200]", "before the last epoch"]),
    (["train", "--out", "{tmp}/t", "--htr", "1e-3", "--htr-layers", "bogus"],
     ["unknown layer name", "bogus"]),
    (["train", "--out", "{tmp}/t", "--htr", "1e-3", "--htr-layers", ""], ["--htr-layers"]),
    (["train", "--out", "{tmp}/t", "--data", "mnist", "--model", "lenet"], ["--data-root"]),
    (["train", "--out", "{tmp}/t", "--data", "cifar10", "--model", "resnet20",
      "--data-root", "{tmp}/cifar"], ["labels are strings"]),
    (["train", "--out", "{tmp}/ok"], ["already holds a training run", "--resume"]),
    # ---------------------------------------------------------------- compare
    (["compare", "{tmp}/runs/badjson"], ["not readable JSON"]),
    (["compare", "{tmp}/runs/notobject"], ["lacks 'config' or 'epochs'"]),
    (["compare", "{tmp}/runs/nokeys"], ["lacks 'config' or 'epochs'"]),
    (["compare", "{tmp}/runs/configstr"], ["'config' must be an object"]),
    (["compare", "{tmp}/runs/epochsint"], ["'epochs' must be a list"]),
    (["compare", "{tmp}/runs/recordint"], ["epochs[0] must be an object"]),
    (["compare", "{tmp}/runs/accstr"], ["'test_acc' must be a number", "'high'"]),
    (["compare", "{tmp}/runs/noepoch"], ["lacks an integer 'epoch'"]),
    (["compare", "{tmp}/runs/gammastr"], ["'htr_gamma' must be a number"]),
    (["compare", "{tmp}/runs/empty"], ["no completed epoch"]),
    (["compare", "{tmp}/runs"], ["metrics.json"]),  # a folder of runs, some malformed
    (["compare", "{tmp}/missing"], ["does not exist"]),
    (["compare", "{tmp}/file"], ["is not a folder"]),
    (["compare", "{tmp}/nothing"], ["no metrics.json"]),
    (["compare"], ["RUN_DIR"]),
    (["compare", "{tmp}/ok", "--out", ""], ["--out is empty"]),
    (["compare", "{tmp}/ok", "--out", "{tmp}/file"], ["is a file"]),
    (["compare", "{tmp}/ok", "--out", "{tmp}/file/sub"], ["cannot create the output folder"]),
    (["compare", "{tmp}/ok", "--seed", "-3"], ["--seed"]),
    # ---------------------------------------------------------------- reproduce
    (["reproduce", "--out", ""], ["--out is empty"]),
    (["reproduce", "--out", "{tmp}/file"], ["is a file"]),
    (["reproduce", "--out", "{tmp}/file/sub"], ["cannot create the output folder"]),
    (["reproduce", "--out", "{tmp}/study", "--quick"], ["holds a different study"]),
    (["reproduce", "--workers", "0"], ["--workers"]),
    (["reproduce", "--device", "bogus", "--out", "{tmp}/r"], ["unknown device 'bogus'"]),
    (["reproduce", "--device", "cuda:99", "--out", "{tmp}/r"], ["cuda:99"]),
    (["reproduce", "--dtype", "float16"], ["--dtype"]),
    (["reproduce", "--threads", "0"], ["--threads"]),
    # ---------------------------------------------------------------- the front
    (["nope"], ["invalid choice: 'nope'"]),
]


@pytest.fixture
def case_dir(tmp_path):
    _fixtures(tmp_path)
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)  # analyze and train set one thread for small models


def _argv(argv: list[str], tmp) -> list[str]:
    return [a.replace("{tmp}", str(tmp)) for a in argv]


def _check(rc, stderr: str, words: list[str]) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2, (rc, stderr)
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize(("argv", "words"), CASES, ids=[" ".join(a) or "''" for a, _ in CASES])
def test_bad_input_is_exit_2_with_one_line(argv, words, case_dir, capsys, monkeypatch):
    monkeypatch.chdir(case_dir)  # nothing may be written into the current folder
    before = sorted(os.listdir(case_dir))
    try:
        rc = main(_argv(argv, case_dir))
    except SystemExit as exit_:  # argparse's own errors
        rc = exit_.code
    _check(rc, capsys.readouterr().err, words)
    after = sorted(os.listdir(case_dir))
    assert [n for n in after if n not in before] in ([], ["o"], ["t"], ["r"])  # no stray files


@pytest.mark.parametrize(("argv", "words"), [
    (["analyze", "--k", "1000000000", "--out", "{tmp}/o"], ["at most --k"]),
    (["compare", "{tmp}/runs/accstr", "--out", "{tmp}/c"], ["'test_acc' must be a number"]),
])
def test_bad_input_as_a_process(argv, words, case_dir):
    proc = subprocess.run([sys.executable, "-m", "hesslens", *_argv(argv, case_dir)],
                          capture_output=True, text=True, timeout=300)
    _check(proc.returncode, proc.stderr, words)
    assert proc.stdout == ""
