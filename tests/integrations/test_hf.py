"""The Hugging Face Trainer callback on a tiny randomly initialised GPT-2 (built from a config,
nothing downloaded)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import hesslens as hl
from hesslens.errors import HesslensInputError
from hesslens.integrations.hf import CurvatureCallback

BLOCK = "transformer.h.1.mlp.c_fc"


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50,
                                      n_positions=32))


def _data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (16, 8), generator=g)
    train_set = [{"input_ids": row, "labels": row} for row in ids]
    probe = [{"input_ids": ids[:3], "labels": ids[:3]}, {"input_ids": ids[3:5], "labels": ids[3:5]}]
    return train_set, probe


class _ModeSpy(TrainerCallback):
    """Runs after the curvature callback: the model must be back in train mode."""

    def __init__(self):
        self.modes = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.modes.append(model.training)


def test_trainer_records_curvature_at_the_steps_asked(tmp_path):
    model = _gpt2()
    train_set, probe = _data()
    callback = CurvatureCallback(probe, every_n_steps=2, out=tmp_path / "curv", layers=[BLOCK],
                                 trace=False)
    spy = _ModeSpy()
    args = TrainingArguments(str(tmp_path / "hf"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, logging_strategy="no", seed=0)
    Trainer(model=model, args=args, train_dataset=train_set,
            callbacks=[callback, spy]).train()
    assert [r["step"] for r in callback.history] == [2, 4]
    assert [r["epoch"] for r in callback.history] == [0.5, 1.0]
    assert spy.modes == [True] * 4  # measured in eval mode, train mode given back
    last = callback.history[-1]
    assert list(last["layers"]) == [BLOCK]
    # step 4 is the last: the record is the curvature of the final weights, own loss, no dropout
    H = hl.Hessian(model.eval(), None, probe)
    assert last["full"]["top_eigenvalues"][0] == pytest.approx(
        float(H.eigenvalues(k=1).values[0]), rel=1e-4)
    assert last["layers"][BLOCK]["top_eigenvalues"][0] == pytest.approx(
        float(H.block(BLOCK).eigenvalues(k=1).values[0]), rel=1e-4)
    saved = json.loads((tmp_path / "curv" / "curvature.json").read_text())
    assert [r["step"] for r in saved["records"]] == [2, 4]
    assert callback.history[0]["full"]["top_eigenvalues"] != last["full"]["top_eigenvalues"]


def test_only_the_main_process_writes(tmp_path):
    model = _gpt2()
    _, probe = _data()
    callback = CurvatureCallback(probe[:1], every_n_epochs=1, out=tmp_path / "c", layers=False,
                                 trace=False)
    state = SimpleNamespace(is_world_process_zero=False, global_step=3, epoch=1.0)
    callback.on_train_begin(None, state, None, model=model)
    callback.on_step_end(None, state, None)  # not asked for by steps
    assert callback.history == []
    callback.on_epoch_end(None, state, None)
    assert [r["step"] for r in callback.history] == [3]
    assert not (tmp_path / "c").exists()


def test_bad_options_are_named():
    with pytest.raises(HesslensInputError, match="every_n_steps must be a positive integer"):
        CurvatureCallback([], every_n_steps=0)
    with pytest.raises(HesslensInputError, match="set by the callback"):
        CurvatureCallback([], every=2)


class _LogSpy(TrainerCallback):
    """Stands where the reporting integrations stand (before the user's callbacks): what
    TensorBoard, W&B or MLflow would receive through on_log."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


def test_sharpness_records_reach_the_trainers_loggers(tmp_path):
    from hesslens.curvature.preconditioned import Preconditioned

    model = _gpt2()
    train_set, probe = _data()
    spy = _LogSpy()
    callback = CurvatureCallback(probe, every_n_steps=2, sharpness=True, tol=1e-6,
                                 out=tmp_path / "sharp")
    args = TrainingArguments(str(tmp_path / "hf"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-3, lr_scheduler_type="constant", report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True,
                             logging_steps=1, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, callbacks=[spy, callback])
    trainer.train()
    assert [r["step"] for r in callback.history] == [2, 4]
    sent = [(step, logs) for step, logs in spy.logs if "hesslens/sharpness" in logs]
    assert [step for step, _ in sent] == [2, 4]
    # the Trainer's own loss logging still happens at every step
    assert [step for step, logs in spy.logs if "loss" in logs] == [1, 2, 3, 4]
    last = callback.history[-1]
    assert sent[-1][1]["hesslens/sharpness"] == last["sharpness"]
    assert any("hesslens/threshold" in h for h in trainer.state.log_history)
    # the Trainer's AdamW (accelerate's wrapper taken off): the preconditioned sharpness
    # against 38 / lr, the last record at the final weights and optimizer state
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, torch.optim.AdamW)
    assert last["compared"] == "preconditioned_sharpness"
    assert all(r["directional_sharpness"] is not None for r in callback.history)
    assert last["threshold"] == pytest.approx(38 / 1e-3)
    H = hl.Hessian(model.eval(), None, probe)
    assert last["sharpness"] == pytest.approx(float(H.eigenvalues(k=1).values[0]), rel=1e-4)
    P = {}
    for name, p in model.named_parameters():
        st, g = opt.state[p], opt.param_groups[0]
        t, (b1, b2) = float(st["step"]), g["betas"]
        P[name] = (1 - b1**t) * ((st["exp_avg_sq"] / (1 - b2**t)).sqrt() + g["eps"])
    ref = Preconditioned(H, P).eigenvalues(k=1, tol=1e-8).values[0]
    assert last["preconditioned_sharpness"] == pytest.approx(float(ref), rel=1e-4)
    assert (tmp_path / "sharp" / "sharpness.json").exists()
    assert callback.write_report(tmp_path / "page").name == "report.html"


def test_sharpness_takes_only_the_monitors_options():
    with pytest.raises(HesslensInputError, match="options of the curvature tracker"):
        CurvatureCallback([], sharpness=True, layers=False)
