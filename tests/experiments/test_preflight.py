"""Every command checks what it needs before any work: a missing or broken module, an output
folder it cannot write, a model it cannot train. Each must exit 2 within seconds, with one line
that names the fix, and leave nothing behind."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hesslens.cli import main
from hesslens.errors import HesslensInputError
from hesslens.experiments import preflight
from hesslens.experiments.preflight import check_ready, require, writable_out_dir

HF_FIX = 'pip install "hesslens[hf]"'
SRC = Path(__file__).resolve().parents[2] / "src"


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# ---------------------------------------------------------------------- the shared helper
def test_a_missing_module_names_its_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an absent package looks like
    with pytest.raises(HesslensInputError) as err:
        require({"transformers": "the zoo model gpt-nano"})
    assert str(err.value) == ("the zoo model gpt-nano needs transformers, which is not "
                              f"installed: {HF_FIX} (or pip install transformers)")
    with pytest.raises(HesslensInputError, match="pip install scikit-learn"):
        monkeypatch.setitem(sys.modules, "sklearn", None)
        require({"sklearn": "the digits data set"})


@pytest.mark.parametrize(("body", "words"), [
    ("import hesslens_no_such_dependency\n", ["fails to import", "hesslens_no_such_dependency",
                                              "reinstall it: pip install brokenpkg"]),
    ("raise RuntimeError('compiled for another torch')\n",
     ["fails to import (RuntimeError: compiled for another torch)", "reinstall it"]),
])
def test_a_broken_module_is_told_from_a_missing_one(body, words, tmp_path, monkeypatch):
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(HesslensInputError) as err:
        require({"brokenpkg": "the demo"})
    assert "not installed" not in str(err.value)
    for word in words:
        assert word in str(err.value)
    assert "brokenpkg" not in sys.modules


def test_the_output_folder_is_checked_without_creating_anything(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(HesslensInputError, match="is a file, not a folder"):
        writable_out_dir(tmp_path / "file")
    with pytest.raises(HesslensInputError,
                       match=r"cannot create the output folder .*file/a/b: .*file is a file"):
        writable_out_dir(tmp_path / "file" / "a" / "b")
    with pytest.raises(HesslensInputError, match="is empty"):
        writable_out_dir("  ")
    assert writable_out_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert sorted(os.listdir(tmp_path)) == ["file"]
    # permissions (simulated: the tests may run as root, for whom every folder is writable)
    locked = str(tmp_path)
    monkeypatch.setattr(preflight.os, "access", lambda p, mode: str(p) != locked)
    with pytest.raises(HesslensInputError, match="is not writable"):
        writable_out_dir(tmp_path)
    with pytest.raises(HesslensInputError, match=r"cannot create .* is not writable"):
        writable_out_dir(tmp_path / "new")


def test_check_ready_checks_modules_before_the_device_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(HesslensInputError, match="transformers"):  # not the bogus device
        check_ready(out=tmp_path / "file" / "x", device="bogus",
                    needs={"transformers": "the demo"})
    with pytest.raises(HesslensInputError, match="unknown device 'bogus'"):
        check_ready(out=tmp_path / "o", device="bogus")
    ready = check_ready(out=tmp_path / "o", device="cpu")
    assert ready.out == tmp_path / "o" and ready.device.type == "cpu"
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------- every command
@pytest.mark.parametrize(("argv", "blocked", "words"), [
    (["reproduce", "--quick"], "transformers", ["transformer block study (gpt-nano)", HF_FIX]),
    (["reproduce"], "transformers", [HF_FIX]),
    (["reproduce", "--quick"], "matplotlib", ["report's figures", "pip install matplotlib"]),
    (["analyze", "--model", "gpt-nano", "--data", "modadd"], "transformers",
     ["the zoo model gpt-nano", HF_FIX]),
    (["analyze", "--model", "mlp", "--data", "digits"], "matplotlib", ["pip install matplotlib"]),
    (["compare", "{tmp}/nothing"], "matplotlib", ["--no-figures", "pip install matplotlib"]),
])
def test_every_command_stops_at_once_on_a_missing_module(argv, blocked, words, tmp_path,
                                                         monkeypatch, capsys):
    (tmp_path / "nothing").mkdir()
    monkeypatch.setitem(sys.modules, blocked, None)
    monkeypatch.chdir(tmp_path)
    start = time.process_time()  # CPU time: the machine may be busy with other work
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--out", str(tmp_path / "o")])
    seconds = time.process_time() - start
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and seconds < 5, (rc, seconds)
    for word in words:
        assert word in line, (word, line)
    assert sorted(os.listdir(tmp_path)) == ["nothing"]  # no output folder, nothing written


def test_train_refuses_a_model_it_cannot_train_before_any_work(tmp_path, capsys):
    # vit-tiny returns a Hugging Face output, not logits: the trainer used to crash on it
    rc = main(["train", "--model", "vit-tiny", "--data", "digits", "--out", str(tmp_path / "t")])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and "vit-tiny is a Hugging Face model" in line and "hesslens analyze" in line
    assert not (tmp_path / "t").exists()


def test_reproduce_without_transformers_exits_2_in_seconds_as_a_process(tmp_path):
    """The README's command on a machine where transformers cannot be imported: a
    sitecustomize blocks it, as if it were not installed."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent("""\
        import sys
        sys.modules["transformers"] = None  # an import of it fails as if not installed
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(SRC)]),
           "MPLBACKEND": "Agg"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "hesslens", "reproduce", "--out",
                           str(tmp_path / "study")], capture_output=True, text=True, env=env,
                          timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds, not wall time, which a busy machine stretches: starting python and torch
    # and the checks take about 3; the study would take minutes before it needed transformers
    seconds = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    line = _one_line(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert seconds < 10, seconds
    assert line.startswith("hesslens reproduce: error: ") and HF_FIX in line
    assert not (tmp_path / "study").exists()
