"""Checkpoints record what bit-exact resuming needs, and stale temporary files are cleaned up."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from hesslens.files import remove_stale_temporaries, write_bytes
from hesslens.training import TrainConfig, train
from hesslens.training.checkpoint import (
    ResumeDiffersWarning,
    check_bit_exactness,
    load_checkpoint,
    save_checkpoint,
)
from tests.training.tiny import two_class_data, two_class_model

_data, _model = two_class_data, two_class_model


CFG = TrainConfig(epochs=2, batch_size=12, lr=0.1, val_fraction=0.25, seed=0)


class _Stop(Exception):
    pass


def _stop_at(epoch: int):
    def cb(e, record, model):
        if e == epoch:
            raise _Stop

    return cb


def _kill_during_write(path) -> None:
    """A child process that dies (SIGKILL) between writing a temporary file and moving it."""
    code = ("import os, hesslens.files as f\n"
            "os.replace = lambda *a: os.kill(os.getpid(), 9)\n"
            f"f.write_bytes({str(path)!r}, b'half')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9


def _temporaries(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


def test_checkpoint_records_the_bit_exactness_settings_and_loads_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 1})
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["bit_exactness"] == {
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "torch": torch.__version__, "device_type": "cpu"}
    assert load_checkpoint(path)["epoch"] == 1


def test_check_names_each_setting_that_differs():
    saved = {"bit_exactness": {"threads": torch.get_num_threads() + 3,
                               "deterministic_algorithms": True, "torch": "1.0",
                               "device_type": "cpu"}}
    with pytest.warns(ResumeDiffersWarning, match="threads .*last bits.*--threads") as rec:
        differ = check_bit_exactness(saved, "x.pt")
    expected = ["threads", "torch"]
    if not torch.are_deterministic_algorithms_enabled():
        expected.insert(1, "deterministic_algorithms")
    assert differ == expected
    assert "x.pt" in str(rec[0].message) and "torch '1.0' then" in str(rec[0].message)
    with pytest.warns(ResumeDiffersWarning, match="does not record"):
        assert check_bit_exactness({"model": {}}) == []


def test_resume_with_another_thread_count_warns_by_name(tmp_path):
    threads = torch.get_num_threads()
    with pytest.raises(_Stop):
        train(CFG, tmp_path, progress=False, model=_model(), dataset=_data(),
              callbacks=[_stop_at(2)])
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    torch.set_num_threads(threads + 1)
    try:
        with pytest.warns(ResumeDiffersWarning, match=f"threads {threads} then, {threads + 1}"):
            result = train(CFG, tmp_path, progress=False, resume=True, model=_model(),
                           dataset=_data())
    finally:
        torch.set_num_threads(threads)
    assert len(result["epochs"]) == 2


def test_resume_with_the_same_settings_is_silent_and_bit_exact(tmp_path):
    whole = train(CFG, tmp_path / "whole", progress=False, model=_model(), dataset=_data())
    with pytest.raises(_Stop):
        train(CFG, tmp_path / "cut", progress=False, model=_model(), dataset=_data(),
              callbacks=[_stop_at(2)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeDiffersWarning)
        resumed = train(CFG, tmp_path / "cut", progress=False, resume=True, model=_model(),
                        dataset=_data())
    keys = ("train_loss", "val_loss", "test_loss")
    assert [[r[k] for k in keys] for r in resumed["epochs"]] == \
        [[r[k] for k in keys] for r in whole["epochs"]]


def test_temporary_file_of_a_killed_writer_is_removed_at_the_next_run_start(tmp_path):
    _kill_during_write(tmp_path / "checkpoint.pt")
    left = _temporaries(tmp_path)
    assert len(left) == 1 and left[0].startswith(".checkpoint.pt.")
    train(CFG, tmp_path, progress=False, resume=True, model=_model(), dataset=_data())
    assert _temporaries(tmp_path) == []
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 2


def test_only_stale_temporaries_are_removed(tmp_path):
    _kill_during_write(tmp_path / "metrics.json")
    (stale,) = _temporaries(tmp_path)
    own = f".r.json.{os.getpid()}-{__import__('hesslens.files').files._TOKEN}.abcd1234.tmp"
    reused_pid = f".r.json.{os.getpid()}-0000beef.abcd1234.tmp"  # an earlier process, same pid
    live_other = f".r.json.{os.getppid()}-0000beef.abcd1234.tmp"  # a live writer
    legacy = ".r.json.abcd1234.tmp"  # before owners were recorded
    for name in (own, reused_pid, live_other, legacy, "notes.tmp", "keep.json"):
        (tmp_path / name).write_bytes(b"")
    removed = sorted(p.name for p in remove_stale_temporaries(tmp_path))
    assert removed == sorted([stale, reused_pid, legacy])
    assert sorted(os.listdir(tmp_path)) == sorted([own, live_other, "notes.tmp", "keep.json"])
    write_bytes(tmp_path / "r.json", b"{}")  # an ordinary write leaves no temporary behind
    assert sorted(_temporaries(tmp_path)) == sorted([own, live_other, "notes.tmp"])


def test_metrics_record_the_data_fingerprint_and_versions(tmp_path):
    import json

    from hesslens.provenance import dataset_fingerprint

    data = _data()
    train(CFG, tmp_path, progress=False, model=_model(), dataset=data)
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["data"] == dataset_fingerprint(data, "tensors")
    assert doc["data"]["sizes"] == {"x_train": [36, 5], "y_train": [36], "x_test": [12, 5],
                                    "y_test": [12]}
    assert doc["versions"]["torch"] == torch.__version__ and doc["versions"]["device"] == "cpu"
