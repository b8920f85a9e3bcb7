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
    (["train", "--out", "{tmp}/ok", "--resume"], ["no checkpoint.pt to resume it from"]),
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
    assert [n for n in after if n not in before] == []  # no stray files, no empty --out


@pytest.mark.parametrize(("argv", "words"), [
    (["analyze", "--k", "1000000000", "--out", "{tmp}/o"], ["at most --k"]),
    (["compare", "{tmp}/runs/accstr", "--out", "{tmp}/c"], ["'test_acc' must be a number"]),
])
def test_bad_input_as_a_process(argv, words, case_dir):
    proc = subprocess.run([sys.executable, "-m", "hesslens", *_argv(argv, case_dir)],
                          capture_output=True, text=True, timeout=300)
    _check(proc.returncode, proc.stderr, words)
    assert proc.stdout == ""


# -------------------------------------------------------------------- seeds
@pytest.mark.parametrize("command", [["train", "--out", "{tmp}/t"], ["analyze", "--out",
                                     "{tmp}/o"], ["reproduce", "--out", "{tmp}/r"],
                                     ["compare", "{tmp}/ok", "--out", "{tmp}/c"]])
@pytest.mark.parametrize(("seed", "words"), [
    ("4294967296", ["--seed", "below 2**32"]),  # scikit-learn's random_state range
    (str(2**64), ["--seed", "below 2**32"]),  # past torch's too
    ("2**64", ["--seed", "non-negative integer"]),
])
def test_a_seed_outside_32_bits_is_refused_before_any_work(command, seed, words, case_dir,
                                                           capsys, monkeypatch):
    monkeypatch.chdir(case_dir)
    before = sorted(os.listdir(case_dir))
    with pytest.raises(SystemExit) as exit_:
        main(_argv([*command, "--seed", seed], case_dir))
    _check(exit_.value.code, capsys.readouterr().err, words)
    assert sorted(os.listdir(case_dir)) == before  # no output folder left behind


# -------------------------------------------------------------------- checkpoints
TRAIN = ["train", "--model", "mlp", "--data", "digits", "--epochs", "2", "--batch-size", "64",
         "--lr", "0.05", "--track-every", "0", "--quiet", "--threads", "1"]


class _Stop(Exception):
    pass


def _stop_at_2(epoch, record, model):
    if epoch == 2:
        raise _Stop


@pytest.fixture(scope="module")
def half_run(tmp_path_factory):
    """A ``hesslens train`` run killed during epoch 2 of 2: its checkpoint is epoch 1's, so a
    resume would train epoch 2."""
    import argparse

    from hesslens.experiments.train import add_train_arguments, config_from_args, train_zoo

    out = tmp_path_factory.mktemp("half") / "run"
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    config = config_from_args(parser.parse_args([*TRAIN[1:], "--out", str(out)]))
    with pytest.raises(_Stop):
        train_zoo(config, out, progress=False, callbacks=[_stop_at_2])
    return out


def _flip_momentum(path):
    """Flip 100 bytes inside a momentum buffer of the saved file (bytes on disk, not values)."""
    ckpt = torch.load(path, weights_only=True)
    buf = ckpt["optimizer"]["state"][0]["momentum_buffer"].numpy().tobytes()
    raw = bytearray(path.read_bytes())
    at = raw.find(buf[:4096])
    assert at > 0 and len(buf) > 600
    for i in range(at + 200, at + 300):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def _edit(change, reseal=True):
    """Load the checkpoint, change it, write it back (with a checksum of the new content when
    ``reseal``: an edit that also forged the checksum, so the structural checks must find
    it)."""
    from hesslens.training.checkpoint import save_checkpoint

    def apply(path):
        ckpt = torch.load(path, weights_only=True)
        ckpt = change(ckpt)
        if reseal:
            save_checkpoint(path, ckpt)
        else:
            torch.save(ckpt, path)
    return apply


def _set(**kv):
    def change(ckpt):
        ckpt.update(kv)
        return ckpt
    return change


def _nested(keys, value):
    def change(ckpt):
        d = ckpt
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value(d[keys[-1]]) if callable(value) else value
        return ckpt
    return change


def _replace_file(make):
    def apply(path):
        path.unlink()
        make(path)
    return apply


CHECKPOINT_CASES = {
    "100 flipped bytes in a momentum buffer": (_flip_momentum, ["corrupted", "checksum"]),
    "epoch 99 of 2": (_edit(_set(epoch=99)), ["epoch 99 is outside [0, 2]"]),
    "epoch 99, checksum not forged": (_edit(_set(epoch=99), reseal=False),
                                      ["epoch 99 is outside", "checksum does not match"]),
    "epoch -3": (_edit(_set(epoch=-3)), ["epoch -3 is outside"]),
    "a bare tensor": (_replace_file(lambda p: torch.save(torch.zeros(3), p)),
                      ["holds a Tensor"]),
    "no model key": (_edit(lambda c: {k: v for k, v in c.items() if k != "model"}),
                     ["lacks 'model'"]),
    "metrics a string": (_edit(_set(metrics="good")), ["'metrics' is a str"]),
    "a weight of the wrong shape": (
        _edit(_nested(["model", "features.1.weight"], lambda w: torch.zeros(w.shape[0], 3))),
        ["size mismatch for features.1.weight"]),
    "python rng state a string": (_edit(_nested(["rng", "python", "state"], "garbage")),
                                  ["rng['python']"]),
    "torch rng state truncated": (_edit(_nested(["rng", "torch"], lambda t: t[:100])),
                                  ["rng['torch']"]),
    "numpy rng keys out of range": (_edit(_nested(["rng", "numpy", "keys"],
                                                  lambda k: k + 2**33)), ["rng['numpy']"]),
    "rank rng states missing": (_edit(_set(rng_ranks=[])), ["per-process random states"]),
    "momentum buffer of the wrong shape": (
        _edit(_nested(["optimizer", "state", 0, "momentum_buffer"], torch.zeros(2, 2))),
        ["momentum_buffer of parameter 0 has shape (2, 2)"]),
    "a NaN weight": (_edit(_nested(["model", "features.1.bias"],
                                   lambda b: torch.full_like(b, float("nan")))),
                     ["features.1.bias holds NaN"]),
    "global_step not the epoch's": (_edit(_set(global_step=3)), ["global_step 3"]),  # train
    "schedule not at the epoch": (_edit(_nested(["scheduler", "last_epoch"], 7)),
                                  ["schedule stands at epoch 7"]),
    "the checksum removed": (_edit(lambda c: {k: v for k, v in c.items() if k != "checksum"},
                                   reseal=False), ["carries no checksum"]),
    "an old format": (_edit(_set(format=1)), ["format 1", "older hesslens"]),
    "format a string": (_edit(_set(format="2")), ["'format' is a str"]),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:300]), ["cannot read checkpoint"]),
    "empty": (lambda p: p.write_bytes(b""), ["cannot read checkpoint"]),
    "a folder": (_replace_file(lambda p: p.mkdir()), ["is a folder, not a file"]),
}


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_a_bad_checkpoint_is_exit_2_names_the_file_and_trains_nothing(case, half_run, tmp_path,
                                                                     capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(half_run, run)
    corrupt, words = CHECKPOINT_CASES[case]
    corrupt(run / "checkpoint.pt")
    before = _snapshot(run)
    rc = main([*TRAIN, "--out", str(run), "--resume"])
    _check(rc, capsys.readouterr().err, [str(run / "checkpoint.pt"), *words])
    assert _snapshot(run) == before  # nothing trained, nothing written, no lock left
    if "global_step" in case:
        return  # the steps an epoch takes depend on the data: the trainer's check alone
    # analyze reads it through the same checks
    rc = main(["analyze", "--checkpoint", str(run / "checkpoint.pt"), "--out",
               str(tmp_path / "a"), "--quiet"])
    _check(rc, capsys.readouterr().err, [str(run / "checkpoint.pt"), *words])
    assert not (tmp_path / "a").exists()


def test_the_intact_checkpoint_resumes(half_run, tmp_path, capsys):
    """The control of the table above: the same copy, not corrupted, trains epoch 2."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(half_run, run)
    assert main([*TRAIN, "--out", str(run), "--resume"]) == 0
    epochs = json.loads((run / "metrics.json").read_text())["epochs"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert sorted(os.listdir(run)) == ["checkpoint.pt", "config.json", "metrics.csv",
                                       "metrics.json"]


def test_resuming_a_run_of_another_model_is_refused(half_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(half_run, run)
    before = _snapshot(run)
    argv = [a if a != "mlp" else "mlp5" for a in TRAIN]
    rc = main([*argv, "--out", str(run), "--resume"])
    _check(rc, capsys.readouterr().err, ["configuration differs in ['model']", "mlp5"])
    assert _snapshot(run) == before
