"""The trainer: exact resume, BatchNorm modes, metrics files, arms, bad input."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from hesslens.errors import HesslensInputError
from hesslens.training import TensorData, TrainConfig, train
from hesslens.training.checkpoint import load_checkpoint
from hesslens.training.trainer import TIMING_KEYS, epoch_seed


def _data(n=96, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 32, d, generator=g)
    w = torch.randn(d, k, generator=g)
    y = (x @ w).argmax(1)
    return TensorData(x[:n], y[:n], x[n:], y[n:], num_classes=k)


def _model(seed=0, dropout=True):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(0.2))
    layers += [nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)]
    return nn.Sequential(*layers)


def _cfg(**kw):
    base = dict(epochs=3, batch_size=16, lr=0.05, val_fraction=0.25, schedule="multistep",
                milestones=[2])
    base.update(kw)
    if "milestones" not in kw and base["milestones"]:  # a decay before the last epoch only
        base["milestones"] = [m for m in base["milestones"] if m < base["epochs"]] or None
    return TrainConfig(**base)


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


class Kill(Exception):
    pass


def _kill_at(epoch):
    def cb(e, record, model):
        if e == epoch:
            raise Kill
    return cb


ARMS = {
    "htr": dict(htr_gamma=1e-2, htr_layers="middle", htr_every=2, htr_probes=2),
    "sam+l2": dict(sam_rho=0.05, weight_decay=1e-3, schedule="cosine", milestones=None),
    "htr-fd": dict(htr_gamma=1e-2, htr_method="fd", htr_start=1),
}


@pytest.mark.parametrize("arm", list(ARMS))
def test_resume_reproduces_the_uninterrupted_run(tmp_path, arm):
    dropout = arm != "htr-fd"  # the finite difference needs a deterministic forward
    cfg = _cfg(**ARMS[arm])
    data = _data()
    straight = train(cfg, tmp_path / "a", progress=False, model=_model(dropout=dropout),
                     dataset=data)
    with pytest.raises(Kill):  # killed during epoch 3, after epoch 2's checkpoint
        train(cfg, tmp_path / "b", progress=False, model=_model(dropout=dropout), dataset=data,
              callbacks=[_kill_at(3)])
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 2
    torch.manual_seed(12345)  # whatever happened in between must not matter
    resumed_model = _model(seed=99, dropout=dropout)
    resumed = train(cfg, tmp_path / "b", progress=False, resume=True, model=resumed_model,
                    dataset=data)
    assert _strip(resumed["epochs"]) == _strip(straight["epochs"])
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["global_step"] == b["global_step"]
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["epochs"][-1]["test_acc"] \
        == json.loads((tmp_path / "b" / "metrics.json").read_text())["epochs"][-1]["test_acc"]
    # resuming a finished run does nothing and returns the same records
    again = train(cfg, tmp_path / "b", progress=False, resume=True,
                  model=_model(dropout=dropout), dataset=data)
    assert _strip(again["epochs"]) == _strip(straight["epochs"])


def test_batchnorm_trains_in_train_mode_every_epoch_and_evaluates_in_eval_mode(tmp_path):
    model = _model()
    seen = []  # (grad enabled, BN training flag) at every BN call
    model[1].register_forward_pre_hook(
        lambda m, inp: seen.append((torch.is_grad_enabled(), m.training)))
    epochs_seen = []
    cfg = _cfg(epochs=3, sam_rho=0.05)

    def cb(epoch, record, m):
        epochs_seen.append(list(seen))
        seen.clear()

    train(cfg, tmp_path / "r", progress=False, model=model, dataset=_data(), callbacks=[cb])
    assert len(epochs_seen) == 3
    for calls in epochs_seen:
        train_calls = [t for g, t in calls if g]
        eval_calls = [t for g, t in calls if not g]
        assert len(train_calls) == 2 * 5  # 72 training examples, batch 16, two SAM passes
        assert all(train_calls)
        assert eval_calls and not any(eval_calls)


def test_metrics_and_checkpoint_files(tmp_path):
    cfg = _cfg(epochs=2, htr_gamma=1e-3, milestones=[1])
    out = tmp_path / "run"
    result = train(cfg, out, progress=False, model=_model(), dataset=_data())
    data = json.loads((out / "metrics.json").read_text())
    assert data["config"] == cfg.to_dict()
    assert data["arm"] == result["arm"] == "SGD+HTR(1e-03, all, hvp, every 1)"
    assert [r["epoch"] for r in data["epochs"]] == [1, 2]
    rec = data["epochs"][-1]
    for key in ("train_loss", "train_acc", "val_acc", "test_acc", "htr_penalty", "lr",
                "epoch_seconds", "htr_steps"):
        assert rec[key] is not None, key
    assert rec["htr_steps"] == 5
    assert [r["lr"] for r in data["epochs"]] == [0.05, 0.05 * 0.25]
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and float(rows[1]["test_acc"]) == rec["test_acc"]
    assert json.loads((out / "config.json").read_text())["htr_gamma"] == 1e-3
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "rng", "epoch", "metrics",
                         "penalty", "global_step"}
    assert ckpt["epoch"] == 2 and len(ckpt["metrics"]) == 2
    assert not list(out.glob(".*tmp"))  # no temporary files left behind


def test_htr_every_and_start(tmp_path):
    cfg = _cfg(epochs=3, htr_gamma=1e-3, htr_every=3, htr_start=1, val_fraction=0.0)
    recs = train(cfg, tmp_path / "r", progress=False, model=_model(), dataset=_data())["epochs"]
    # 96 examples / 16 = 6 steps per epoch; global steps 6..11 and 12..17 are in epochs 2, 3
    assert [r["htr_steps"] for r in recs] == [0, 2, 2]
    assert recs[0]["htr_penalty"] is None and recs[1]["htr_penalty"] is not None
    assert recs[0]["val_acc"] is None


def test_data_order_depends_on_seed_and_epoch_only():
    assert epoch_seed(0, 1) == epoch_seed(0, 1)
    assert len({epoch_seed(s, e) for s in range(3) for e in range(3)}) == 9


def test_same_seed_same_run_and_other_seed_differs(tmp_path):
    cfg = _cfg(epochs=1)
    a = train(cfg, tmp_path / "a", progress=False, model=_model(), dataset=_data())
    b = train(cfg, tmp_path / "b", progress=False, model=_model(), dataset=_data())
    c = train(_cfg(epochs=1, seed=1), tmp_path / "c", progress=False, model=_model(),
              dataset=_data())
    assert _strip(a["epochs"]) == _strip(b["epochs"])
    assert _strip(a["epochs"]) != _strip(c["epochs"])


def test_refuses_to_overwrite_and_checks_config_on_resume(tmp_path):
    cfg = _cfg(epochs=1)
    train(cfg, tmp_path / "r", progress=False, model=_model(), dataset=_data())
    with pytest.raises(HesslensInputError, match="already holds"):
        train(cfg, tmp_path / "r", progress=False, model=_model(), dataset=_data())
    with pytest.raises(HesslensInputError, match=r"differs in \['lr'\]"):
        train(_cfg(epochs=1, lr=0.1), tmp_path / "r", progress=False, resume=True,
              model=_model(), dataset=_data())


@pytest.mark.parametrize("kw, msg", [
    ({"epochs": 0}, "epochs"),
    ({"schedule": "step"}, "schedule"),
    ({"htr_method": "exact"}, "htr_method"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"momentum": 1.5}, "momentum"),
    ({"htr_layers": []}, "htr_layers"),
    ({"device": "tpu"}, "device"),
])
def test_bad_config(tmp_path, kw, msg):
    with pytest.raises(HesslensInputError, match=msg):
        train(_cfg(**kw), tmp_path / "r", progress=False, model=_model(), dataset=_data())


def test_unknown_htr_layer_is_reported(tmp_path):
    with pytest.raises(HesslensInputError, match="valid layer names"):
        train(_cfg(htr_gamma=1e-3, htr_layers=["nope"]), tmp_path / "r", progress=False,
              model=_model(), dataset=_data())


def test_config_round_trip():
    cfg = _cfg(htr_layers=["0", "4"])
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(HesslensInputError, match="unknown training-config field"):
        TrainConfig.from_dict({"lr": 0.1, "learning_rate": 0.1})


def _bad(data, **changes):
    fields = dict(x_train=data.x_train, y_train=data.y_train, x_test=data.x_test,
                  y_test=data.y_test, num_classes=data.num_classes)
    fields.update(changes)
    return TensorData(**fields)


@pytest.mark.parametrize("change, msg", [
    (lambda d: dict(x_train=d.x_train[:0], y_train=d.y_train[:0]), "training set is empty"),
    (lambda d: dict(x_test=d.x_test[:0], y_test=d.y_test[:0]), "test set is empty"),
    (lambda d: dict(y_train=d.y_train[:-5]), "96 inputs but 91 labels"),
    (lambda d: dict(y_test=d.y_test.float()), "integer class indices"),
    (lambda d: dict(y_train=d.y_train + 1), r"outside the 3 classes"),
    (lambda d: dict(x_train=d.x_train.clone().index_fill_(0, torch.tensor([3]), float("nan"))),
     "NaN or infinite"),
], ids=["empty-train", "empty-test", "lengths", "float-labels", "label-range", "nan"])
def test_bad_data_is_named(tmp_path, change, msg):
    data = _data()
    with pytest.raises(HesslensInputError, match=msg):
        train(_cfg(), tmp_path / "r", progress=False, model=_model(),
              dataset=_bad(data, **change(data)))


def test_validation_split_that_leaves_nothing_to_train_on(tmp_path):
    data = _data(n=3)
    with pytest.raises(HesslensInputError, match="leaves none to train on"):
        train(_cfg(val_fraction=0.9), tmp_path / "r", progress=False, model=_model(),
              dataset=data)


def test_model_without_trainable_parameters(tmp_path):
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(HesslensInputError, match="no trainable parameters"):
        train(_cfg(), tmp_path / "r", progress=False, model=model, dataset=_data())


@pytest.mark.parametrize("device", ["cuda:abc", "cudax", "tpu"])
def test_unparsable_device(tmp_path, device):
    with pytest.raises(HesslensInputError, match="device must be"):
        train(_cfg(device=device), tmp_path / "r", progress=False, model=_model(),
              dataset=_data())


def test_resume_after_a_callback_stored_numpy_values(tmp_path):
    import numpy as np

    def note(epoch, record, model):
        record["weight_norm"] = np.float64(1.5) * epoch

    cfg = _cfg(epochs=2)
    with pytest.raises(Kill):
        train(cfg, tmp_path / "r", progress=False, model=_model(), dataset=_data(),
              callbacks=[note, _kill_at(2)])
    load_checkpoint(tmp_path / "r" / "checkpoint.pt")  # weights_only=True
    out = train(cfg, tmp_path / "r", progress=False, resume=True, model=_model(),
                dataset=_data(), callbacks=[note])
    assert [r["weight_norm"] for r in out["epochs"]] == [1.5, 3.0]


def test_truncated_checkpoint_is_named(tmp_path):
    cfg = _cfg(epochs=1)
    train(cfg, tmp_path / "r", progress=False, model=_model(), dataset=_data())
    ckpt = tmp_path / "r" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(HesslensInputError, match="cannot read checkpoint"):
        train(cfg, tmp_path / "r", progress=False, resume=True, model=_model(), dataset=_data())


@pytest.mark.parametrize("schedule, expected", [
    ("cosine", lambda e, n, lr: lr * (1 + __import__("math").cos(__import__("math").pi * e / n))
     / 2),
    ("multistep", lambda e, n, lr: lr * (0.1 if e >= 2 else 1.0)),
    ("none", lambda e, n, lr: lr),
])
def test_recorded_learning_rates_follow_the_schedule(tmp_path, schedule, expected):
    cfg = _cfg(epochs=4, schedule=schedule, milestones=[2] if schedule == "multistep" else None,
               lr_gamma=0.1)
    out = train(cfg, tmp_path / "r", progress=False, model=_model(), dataset=_data())
    for e, rec in enumerate(out["epochs"]):
        assert rec["lr"] == pytest.approx(expected(e, 4, cfg.lr), rel=1e-12, abs=1e-15), e


def test_weight_decay_is_the_l2_arm():
    from hesslens.training.trainer import build_optimizer

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = build_optimizer(model, _cfg(weight_decay=0.1, momentum=0.0, lr=0.5))
    w0 = model.weight.detach().clone()
    model.weight.grad = torch.zeros_like(model.weight)
    model.bias.grad = torch.zeros_like(model.bias)
    opt.step()  # zero loss gradient: only the decay moves the weights
    torch.testing.assert_close(model.weight.detach(), w0 * (1 - 0.5 * 0.1))
