"""The trainer's callback protocol: ``cb(epoch, record, model)`` after each epoch, ``start(run)``
before the first step with the run's context, ``initial`` for a call at epoch 0, and a
configuration that asks for tracking refused without a callback that tracks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import hesslens.training
from hesslens.errors import HesslensInputError, TrackingCallbackError
from hesslens.parallel import Ranks
from hesslens.splits import analysis_subset
from hesslens.training import TrainConfig, TrainingRun, train
from tests.training.tiny import three_class_data, three_class_model

SRC = Path(hesslens.training.__file__).resolve().parents[1]


_data, _model = three_class_data, three_class_model


class _Spy:
    """Remembers what the trainer told it and when."""

    def __init__(self, initial=False, tracks=False):
        self.initial = initial
        self.tracks_curvature = tracks
        self.runs: list[TrainingRun] = []
        self.weights_at_start: list[dict[str, torch.Tensor]] = []
        self.calls: list[tuple[int, dict]] = []

    def start(self, run):
        self.runs.append(run)
        self.weights_at_start.append({k: v.clone() for k, v in run.model.state_dict().items()})

    def __call__(self, epoch, record, model):
        self.calls.append((epoch, dict(record)))
        record["spy"] = epoch


CFG = dict(epochs=2, batch_size=16, lr=0.1, momentum=0.5, val_fraction=0.25, seed=3,
           track_per_class=4)


def test_start_gets_the_run_before_the_first_step(tmp_path):
    data, model = _data(), _model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    spy = _Spy()
    result = train(TrainConfig(**CFG), tmp_path / "r", model=model, dataset=data,
                   progress=False, callbacks=[spy])
    (run,) = spy.runs
    assert run.model is model and run.config == TrainConfig(**CFG).validate()
    assert isinstance(run.optimizer, torch.optim.SGD)
    assert run.optimizer.defaults["lr"] == 0.1  # (the schedule has lowered the group's since)
    assert set(map(id, run.optimizer.param_groups[0]["params"])) == set(
        map(id, model.parameters()))
    assert run.device == torch.device("cpu") and run.ranks == Ranks()
    assert run.loss_fn is nn.functional.cross_entropy
    for k, v in spy.weights_at_start[0].items():  # before any step
        assert torch.equal(v, initial[k]), k
    # the analysis data: analysis_subset of the data set's training part, track_per_class each
    xa, ya = analysis_subset(data.x_train, data.y_train, per_class=4, seed=0)
    assert torch.equal(run.analysis_data[0], xa) and torch.equal(run.analysis_data[1], ya)
    assert torch.bincount(ya).tolist() == [4, 4, 4]
    # called after every epoch, in order, with the epoch's record; its keys are kept
    assert [e for e, _ in spy.calls] == [1, 2]
    assert {"train_loss", "val_acc", "test_acc"} <= set(spy.calls[0][1])
    assert [r["spy"] for r in result["epochs"]] == [1, 2]


def test_initial_asks_for_a_call_at_epoch_0_before_training(tmp_path):
    early, late = _Spy(initial=True), _Spy()
    result = train(TrainConfig(**CFG), tmp_path / "r", model=_model(), dataset=_data(),
                   progress=False, callbacks=[early, late])
    assert [e for e, _ in early.calls] == [0, 1, 2] and [e for e, _ in late.calls] == [1, 2]
    zero = result["epochs"][0]
    assert zero["epoch"] == 0 and zero["spy"] == 0 and "train_loss" not in zero
    assert zero["test_acc"] is not None and zero["val_loss"] is not None
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())["epochs"]
    assert [r["epoch"] for r in saved] == [0, 1, 2]


def test_a_resumed_run_starts_its_callbacks_again_but_keeps_its_epoch_0(tmp_path):
    class Stop(Exception):
        pass

    def stop(epoch, record, model):
        if epoch == 2:
            raise Stop

    first = _Spy(initial=True)
    with pytest.raises(Stop):
        train(TrainConfig(**CFG), tmp_path / "r", model=_model(), dataset=_data(),
              progress=False, callbacks=[first, stop])
    again = _Spy(initial=True)
    result = train(TrainConfig(**CFG), tmp_path / "r", model=_model(), dataset=_data(),
                   progress=False, resume=True, callbacks=[again])
    assert len(again.runs) == 1 and [e for e, _ in again.calls] == [2]
    assert [r["epoch"] for r in result["epochs"]] == [0, 1, 2]


@pytest.mark.parametrize("layers, fix", [(True, "EpochTracking()"),
                                         (False, "EpochSharpness()")])
def test_tracking_asked_for_without_a_callback_that_tracks_is_refused(tmp_path, layers, fix):
    cfg = TrainConfig(**CFG, track_every=1, track_layers=layers)
    with pytest.raises(TrackingCallbackError, match=rf"track_every=1 .*{fix[:-2]}\(\).*"
                                                    r"train_zoo.*track_every=0"):
        train(cfg, tmp_path / "r", model=_model(), dataset=_data(), progress=False,
              callbacks=[_Spy()])
    assert issubclass(TrackingCallbackError, HesslensInputError)
    assert not (tmp_path / "r").exists()  # refused before anything is written
    tracker = _Spy(tracks=True)
    train(cfg, tmp_path / "r", model=_model(), dataset=_data(), progress=False,
          callbacks=[tracker])
    assert [e for e, _ in tracker.calls] == [1, 2]


def test_the_analysis_data_too_small_for_the_processes_is_refused():
    data = _data()
    run = TrainingRun(model=_model(), optimizer=None, config=TrainConfig(track_per_class=1),
                      train_inputs=data.x_train, train_targets=data.y_train,
                      device=torch.device("cpu"), ranks=Ranks(rank=0, world=4),
                      loss_fn=nn.functional.cross_entropy)
    with pytest.raises(HesslensInputError, match="3 examples, fewer than the 4 processes"):
        run.analysis_data  # noqa: B018


_ALONE = """
import sys, tempfile
import torch
from torch import nn
from hesslens.training import TensorData, TrainConfig, train
g = torch.Generator().manual_seed(0)
x = torch.randn(40, 4, generator=g); y = (x[:, 0] > 0).long()
data = TensorData(x[:32], y[:32], x[32:], y[32:], num_classes=2)
seen = []
train(TrainConfig(epochs=1, batch_size=8), tempfile.mkdtemp(), model=nn.Linear(4, 2),
      dataset=data, progress=False, callbacks=[lambda e, r, m: seen.append(e)])
assert seen == [1], seen
print("above", sorted(m for m in sys.modules if m.startswith(
    ("hesslens.analysis", "hesslens.report", "hesslens.experiments", "hesslens.zoo"))))
"""


def test_training_with_callbacks_imports_nothing_above_it():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _ALONE], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "above []"
