"""Output-folder locks: one writer per folder, a named error for the second at once, stale locks
of killed processes taken over, and folders a failed run created removed again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hesslens.errors import HesslensInputError, OutputLockedError, StaleLockWarning
from hesslens.locks import LOCK_NAME, OutputLock, output_lock, read_lock

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _holder(folder: Path) -> subprocess.Popen:
    """A process that takes the lock of ``folder``, says so, and sleeps."""
    proc = _python("""
        import sys, time
        from hesslens.locks import output_lock
        lock = output_lock(sys.argv[1], what="a holder")
        print("held", flush=True)
        time.sleep(120)
        """, str(folder))
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    """``(folder, process)``: a folder whose lock a live process holds (the tests that only
    meet it share it)."""
    folder = tmp_path_factory.mktemp("held") / "out"
    holder = _holder(folder)
    yield folder, holder
    _kill(holder)


def test_a_second_writer_in_this_process_gets_the_named_error(tmp_path):
    with output_lock(tmp_path, what="the first writer") as lock:
        assert lock.held and read_lock(tmp_path)["pid"] == os.getpid()
        with pytest.raises(OutputLockedError, match="in use by this process: the first writer"):
            output_lock(tmp_path, what="the second")
        assert issubclass(OutputLockedError, HesslensInputError)
    assert not lock.held and not (tmp_path / LOCK_NAME).exists()
    with output_lock(tmp_path):  # free again
        pass


def test_another_process_holding_it_is_named_by_pid_and_host(held):
    folder, holder = held
    with pytest.raises(OutputLockedError) as err:
        output_lock(folder)
    text = str(err.value)
    assert str(folder) in text and f"pid {holder.pid}" in text and "a holder" in text
    assert "wait until it ends, or write into another folder" in text


def test_a_stale_lock_of_a_killed_process_is_taken_over(tmp_path):
    holder = _holder(tmp_path)
    _kill(holder)  # SIGKILL: no clean-up ran, the lock file stays
    assert read_lock(tmp_path)["pid"] == holder.pid
    with pytest.warns(StaleLockWarning, match=f"left by a holder \\(pid {holder.pid}"):
        lock = output_lock(tmp_path, what="the rerun")
    assert read_lock(tmp_path)["pid"] == os.getpid() and read_lock(tmp_path)["what"] == \
        "the rerun"
    lock.release()
    assert os.listdir(tmp_path) == []


def test_an_unreadable_stale_lock_file_is_taken_over_too(tmp_path):
    (tmp_path / LOCK_NAME).write_text("not json")  # nobody holds its OS lock
    os.utime(tmp_path / LOCK_NAME, (time.time() - 60, time.time() - 60))
    with pytest.warns(StaleLockWarning, match="another writer"):
        output_lock(tmp_path).release()
    assert os.listdir(tmp_path) == []


def test_a_lock_name_that_is_not_a_file_is_named(tmp_path):
    (tmp_path / LOCK_NAME).mkdir()
    with pytest.raises(OutputLockedError, match="which is not a lock file"):
        output_lock(tmp_path)
    assert os.listdir(tmp_path) == [LOCK_NAME]


def test_a_failed_block_removes_the_folders_it_created_and_only_those(tmp_path):
    deep = tmp_path / "a" / "b" / "c"
    with pytest.raises(RuntimeError), OutputLock(deep, "a run that fails its checks"):
        raise RuntimeError("bad input")
    assert os.listdir(tmp_path) == []  # a, b and c were made by the lock: all gone
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), OutputLock(tmp_path / "kept", "x"):
        raise RuntimeError
    assert os.listdir(tmp_path) == ["kept"]  # it existed before
    with pytest.raises(RuntimeError), OutputLock(tmp_path / "new", "x"):
        (tmp_path / "new" / "result.json").write_text("{}")
        raise RuntimeError
    assert os.listdir(tmp_path / "new") == ["result.json"]  # written to: kept


def test_folders_that_cannot_be_made_are_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(HesslensInputError, match="is a file, not a folder"):
        output_lock(tmp_path / "file")
    with pytest.raises(HesslensInputError, match="cannot create the output folder"):
        output_lock(tmp_path / "file" / "sub")


def test_a_forked_child_leaving_does_not_free_the_parents_lock(tmp_path):
    lock = output_lock(tmp_path, what="the parent")
    pid = os.fork()
    if pid == 0:  # the child runs what its exit handlers would: the lock's release
        try:
            lock.release()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert read_lock(tmp_path)["pid"] == os.getpid()
    with pytest.raises(OutputLockedError):
        output_lock(tmp_path)
    lock.release()


# ---------------------------------------------------------------------- writers racing
RACE = """
    import json, os, sys, time
    from pathlib import Path
    import torch
    from torch import nn
    from hesslens.errors import OutputLockedError
    from hesslens.training import TensorData, TrainConfig, train

    folder, signals, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g); y = (x[:, 0] > 0).long()
    data = TensorData(x[:48], y[:48], x[48:], y[48:], num_classes=2)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    cfg = TrainConfig(model="m", data="d", epochs=2, batch_size=16, lr=0.1, seed=seed)

    def hold(epoch, record, net):  # the winner goes on only once the other has lost
        if epoch == 1:
            for _ in range(600):
                if (signals / "lost").exists():
                    return
                time.sleep(0.05)

    (signals / f"ready{seed}").touch()
    while not (signals / "go").exists():
        time.sleep(0.005)
    try:
        train(cfg, folder, model=model, dataset=data, progress=False, callbacks=[hold])
    except OutputLockedError as err:
        (signals / "lost").write_text(str(err))
        sys.exit(3)
"""


def test_two_training_runs_racing_into_one_folder(tmp_path):
    folder, signals = tmp_path / "run", tmp_path / "signals"
    signals.mkdir()
    procs = [_python(RACE, str(folder), str(signals), str(seed)) for seed in (1, 2)]
    deadline = time.time() + 120
    while not all((signals / f"ready{s}").exists() for s in (1, 2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), \
            [p.stderr.read() for p in procs if p.poll() is not None]
        time.sleep(0.01)
    (signals / "go").touch()  # both start together
    codes = [p.wait(timeout=300) for p in procs]
    assert sorted(codes) == [0, 3], [p.stderr.read() for p in procs]
    winner = (1, 2)[codes.index(0)]
    message = (signals / "lost").read_text()
    assert str(folder) in message and "is in use" in message
    assert f"pid {procs[codes.index(0)].pid}" in message
    # everything in the folder is the winner's, complete
    import torch

    from hesslens.training.checkpoint import load_checkpoint

    assert json.loads((folder / "config.json").read_text())["seed"] == winner
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["config"]["seed"] == winner and [r["epoch"] for r in metrics["epochs"]] == \
        [1, 2]
    ckpt = load_checkpoint(folder / "checkpoint.pt", training=True)
    assert ckpt["config"]["seed"] == winner and ckpt["epoch"] == 2
    assert torch.is_tensor(ckpt["model"]["0.weight"])
    assert sorted(os.listdir(folder)) == ["checkpoint.pt", "config.json", "metrics.csv",
                                          "metrics.json"]  # no lock left behind


TRACKERS = """
    import json, sys, time
    from pathlib import Path
    import torch
    from torch import nn
    from hesslens.errors import OutputLockedError
    from hesslens.report.tracking import CurvatureTracker

    folder, signals, tag = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    (signals / f"ready{tag}").touch()
    while not (signals / "go").exists():
        time.sleep(0.005)
    try:
        tracker = CurvatureTracker(model, nn.functional.cross_entropy, (x, y), out=folder,
                                   layers=False, trace=False)
    except OutputLockedError as err:
        (signals / "lost").write_text(str(err))
        sys.exit(3)
    for _ in range(600):  # hold the folder until the other tracker has lost
        if (signals / "lost").exists():
            break
        time.sleep(0.05)
    for step in range(3):
        tracker.record(step, info={"tag": tag})
    tracker.close()
"""


def test_two_trackers_racing_into_one_folder(tmp_path):
    folder, signals = tmp_path / "curv", tmp_path / "signals"
    signals.mkdir()
    procs = [_python(TRACKERS, str(folder), str(signals), tag) for tag in ("a", "b")]
    deadline = time.time() + 120
    while not all((signals / f"ready{t}").exists() for t in ("a", "b")):
        assert time.time() < deadline and all(p.poll() is None for p in procs), \
            [p.stderr.read() for p in procs if p.poll() is not None]
        time.sleep(0.01)
    (signals / "go").touch()
    codes = [p.wait(timeout=300) for p in procs]
    assert sorted(codes) == [0, 3], [p.stderr.read() for p in procs]
    winner = ("a", "b")[codes.index(0)]
    assert "is in use" in (signals / "lost").read_text()
    records = json.loads((folder / "curvature.json").read_text())["records"]
    assert [(r["step"], r["tag"]) for r in records] == [(s, winner) for s in range(3)]


def test_a_second_tracker_in_one_process_and_after_close(tmp_path):
    import torch
    from torch import nn

    from hesslens.report.tracking import CurvatureTracker

    model = nn.Linear(3, 2)
    data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    first = CurvatureTracker(model, nn.functional.cross_entropy, data, out=tmp_path,
                             layers=False, trace=False)
    with pytest.raises(OutputLockedError, match="a CurvatureTracker holds its lock"):
        CurvatureTracker(model, nn.functional.cross_entropy, data, out=tmp_path)
    first.record(0)
    first.close()
    with pytest.raises(HesslensInputError, match="was closed"):
        first.record(1)
    with CurvatureTracker(model, nn.functional.cross_entropy, data, out=tmp_path,
                          layers=False, trace=False) as second:
        assert [r["step"] for r in second.history] == [0]
    assert sorted(os.listdir(tmp_path)) == ["curvature.csv", "curvature.json"]


# ---------------------------------------------------------------------- the commands
TRAIN = ["train", "--model", "mlp", "--data", "digits", "--epochs", "1", "--track-every", "0",
         "--quiet", "--threads", "1"]


def test_a_command_into_a_held_folder_is_exit_2_and_writes_nothing(held, tmp_path, capsys):
    from hesslens.cli import main

    folder, holder = held
    run = tmp_path / "run"  # a finished run for compare to read
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({
        "config": {"model": "mlp", "data": "digits", "seed": 0, "epochs": 1},
        "epochs": [{"epoch": 1, "test_acc": 0.5}]}))
    for argv in ([*TRAIN, "--out", str(folder)], ["analyze", "--out", str(folder), "--quiet"],
                 ["reproduce", "--quick", "--out", str(folder)],
                 ["compare", str(run), "--out", str(folder), "--no-figures"]):
        rc = main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, lines
        assert "is in use" in lines[0] and f"pid {holder.pid}" in lines[0]
        assert os.listdir(folder) == [LOCK_NAME]


def test_a_training_run_killed_with_sigkill_does_not_block_its_resume(tmp_path):
    out = tmp_path / "run"
    killed = _python("""
        import os, signal, sys
        from hesslens.experiments.train import train_zoo
        from hesslens.training import TrainConfig
        cfg = TrainConfig(model="mlp", data="digits", epochs=2, batch_size=64, lr=0.05)
        def die(epoch, record, model):
            if epoch == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        train_zoo(cfg, sys.argv[1], progress=False, callbacks=[die])
        """, str(out))
    assert killed.wait(timeout=300) == -signal.SIGKILL, killed.stderr.read()
    assert read_lock(out)["pid"] == killed.pid  # the lock of the killed run is left
    argv = ["train", "--model", "mlp", "--data", "digits", "--epochs", "2", "--batch-size",
            "64", "--lr", "0.05", "--track-every", "0", "--quiet", "--out", str(out),
            "--resume"]
    resumed = subprocess.run([sys.executable, "-m", "hesslens", *argv], capture_output=True,
                             text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    (line,) = resumed.stderr.strip().splitlines()  # the warning, as one line
    assert line.startswith("hesslens train: warning: taking over the lock of") and \
        f"pid {killed.pid}" in line and line.endswith("(StaleLockWarning)")
    assert [r["epoch"] for r in json.loads((out / "metrics.json").read_text())["epochs"]] == \
        [1, 2]
    assert read_lock(out) is None


def test_under_torchrun_every_rank_stops_when_rank_0_finds_the_folder_held(held):
    folder, holder = held
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", "-m", "hesslens", *TRAIN, "--out", str(folder)],
        capture_output=True, text=True, env=env, timeout=240)  # a hang would time out
    assert done.returncode != 0
    refusals = [ln for ln in done.stderr.splitlines()
                if ln.startswith("hesslens train: error:") and "is in use" in ln]
    # rank 0's line at least (torchrun may stop rank 1 before it prints its own)
    assert refusals and all(f"pid {holder.pid}" in ln for ln in refusals), done.stderr[-3000:]
    assert os.listdir(folder) == [LOCK_NAME]  # the holder's, alone


def _lock_file(folder: Path, pid: int) -> None:
    import socket

    (folder / LOCK_NAME).write_text(json.dumps({"what": "an old run", "pid": pid,
                                                "host": socket.gethostname()}))


def test_without_os_locks_the_holders_pid_decides(tmp_path, monkeypatch):
    import hesslens.locks as locks

    monkeypatch.setattr(locks, "fcntl", None)  # a system or file system without flock
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    _lock_file(tmp_path, int(dead))
    with pytest.warns(StaleLockWarning, match=f"pid {dead}"):
        output_lock(tmp_path).release()
    _lock_file(tmp_path, os.getppid())  # alive
    with pytest.raises(OutputLockedError, match=f"if that process is gone, delete .*{LOCK_NAME}"):
        output_lock(tmp_path)


def test_without_hard_links_the_lock_file_is_created_exclusively(tmp_path, monkeypatch):
    import errno

    def no_links(*args):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with output_lock(tmp_path, what="the first"):
        assert read_lock(tmp_path)["what"] == "the first"
        with pytest.raises(OutputLockedError, match="in use by this process: the first"):
            output_lock(tmp_path)
        assert os.listdir(tmp_path) == [LOCK_NAME]  # no temporary file left either
    assert os.listdir(tmp_path) == []
