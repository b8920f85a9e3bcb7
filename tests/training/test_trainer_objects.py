"""The trainer takes the model and the data as objects: it runs with no zoo, refuses a call
without them by naming the fix, and holds out the validation part and the tracking subset with
the package's one split and one subset (hesslens.splits)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hesslens.training
from hesslens.analysis.epoch_tracking import EpochTracking
from hesslens.errors import HesslensInputError
from hesslens.splits import analysis_subset, split_train_val
from hesslens.training import TrainConfig, evaluate, train
from tests.training.tiny import three_class_data, three_class_model

SRC = Path(hesslens.training.__file__).resolve().parents[1]


_data, _model = three_class_data, three_class_model


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_the_training_layer_imports_neither_the_zoo_nor_the_experiments():
    upward = {path.name: sorted(n for n in _imports(path)
                                if n.startswith(("hesslens.zoo", "hesslens.experiments",
                                                 "hesslens.cli")))
              for path in sorted((SRC / "training").glob("*.py"))}
    assert {k: v for k, v in upward.items() if v} == {}
    for low in ("checks.py", "splits.py"):  # what the zoo and the trainer share lies below both
        assert not [n for n in _imports(SRC / low)
                    if n.startswith("hesslens.") and n not in (
                        "hesslens.errors", "hesslens.errors.HesslensInputError")
                    and not n.startswith("hesslens.checks")], low


_NO_ZOO = """
import sys, tempfile, math
import torch
from torch import nn
from hesslens.analysis.epoch_tracking import EpochTracking
from hesslens.training import TensorData, TrainConfig, train
g = torch.Generator().manual_seed(0)
x = torch.randn(80, 4, generator=g); y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
data = TensorData(x[:64], y[:64], x[64:], y[64:], num_classes=3)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
cfg = TrainConfig(model="user-net", data="user-data", epochs=2, batch_size=16, lr=0.1,
                  val_fraction=0.25, htr_gamma=1e-3, track_every=1, track_per_class=4)
out = tempfile.mkdtemp()
result = train(cfg, out, model=model, dataset=data, progress=False,
               callbacks=[EpochTracking()])
again = train(cfg, out, model=model, dataset=data, progress=False, resume=True,
              callbacks=[EpochTracking()])
final = result["final"]
assert [r["epoch"] for r in result["epochs"]] == [0, 1, 2], result["epochs"]
assert math.isfinite(final["trace"]) and math.isfinite(final["val_loss"]), final
assert again["final"]["epoch"] == 2
print("zoo-free", sorted(m for m in sys.modules
                         if m.startswith(("hesslens.zoo", "hesslens.experiments"))))
"""


def test_training_a_user_model_on_tensors_needs_no_zoo():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _NO_ZOO], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "zoo-free []"


@pytest.mark.parametrize("given, missing", [
    ({"dataset": _data()}, "model="), ({"model": _model()}, "dataset="),
    ({}, "model= and dataset="),
])
def test_a_missing_model_or_dataset_names_both_fixes(tmp_path, given, missing):
    with pytest.raises(HesslensInputError, match=rf"needs {missing}.*TensorData.*train_zoo"):
        train(TrainConfig(epochs=1), tmp_path / "r", progress=False, **given)
    assert not (tmp_path / "r").exists()


def test_a_dataset_without_the_fields_or_a_model_not_a_module_is_refused(tmp_path):
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(HesslensInputError, match="dataset has no x_train, y_train, x_test"):
        train(TrainConfig(epochs=1), tmp_path / "r", model=_model(), dataset=(x, y))
    with pytest.raises(HesslensInputError, match=r"model must be a torch\.nn\.Module"):
        train(TrainConfig(epochs=1), tmp_path / "r", model=lambda t: t, dataset=_data())
    assert not (tmp_path / "r").exists()


def test_validation_is_the_stratified_split_of_the_training_part(tmp_path):
    data = _data()
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.1, val_fraction=0.2, seed=3,
                      schedule="none")
    model = _model()
    final = train(cfg, tmp_path / "r", model=model, dataset=data, progress=False)["final"]
    _, y_tr, x_val, y_val = split_train_val(data.x_train, data.y_train, 0.2, seed=3)
    assert len(y_val) == 12 and len(y_tr) == 48
    # the same 12 examples, in the same order: the same sums, bit for bit
    assert (final["val_loss"], final["val_acc"]) == evaluate(model, x_val, y_val)
    other = split_train_val(data.x_train, data.y_train, 0.2, seed=4)[2:]
    assert final["val_loss"] != evaluate(model, *other)[0]  # another seed, other examples


def test_tracking_measures_on_the_analysis_subset(tmp_path):
    data = _data()
    seen = []

    def spy(epoch, record, model):
        seen.append(record["trace"])

    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.1, val_fraction=0.0, track_every=1,
                      track_per_class=3)
    model = _model()
    result = train(cfg, tmp_path / "r", model=model, dataset=data, progress=False,
                   callbacks=[EpochTracking(), spy])
    xa, ya = analysis_subset(data.x_train, data.y_train, per_class=3, seed=0)
    assert torch.bincount(ya).tolist() == [3, 3, 3]
    again = EpochTracking(xa, ya, every=1, last_epoch=1).measure(model)
    assert seen == [result["final"]["trace"]] and again["trace"] == seen[0]
