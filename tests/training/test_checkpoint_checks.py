"""Checkpoints carry a checksum of their content and are checked in full before a run resumes
from them; anything wrong is a CheckpointError naming the file, and the run's folder is left as
it was. (The command-line table of corruptions is in tests/experiments/test_cli_errors.py.)"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from hesslens.errors import CheckpointError, HesslensInputError
from hesslens.training import TrainConfig, train
from hesslens.training.checkpoint import (
    CHECKSUM_KEY,
    capture_rng_state,
    check_rng_state,
    check_state_dict,
    check_training_checkpoint,
    content_digest,
    load_checkpoint,
    save_checkpoint,
)
from tests.training.tiny import two_class_data, two_class_model

_data, _model = two_class_data, two_class_model


class _Stop(Exception):
    pass


def _stop_at_2(epoch, record, model):
    if epoch == 2:
        raise _Stop


def _half_run(folder, cfg):
    with pytest.raises(_Stop):
        train(cfg, folder, progress=False, model=_model(), dataset=_data(),
              callbacks=[_stop_at_2])
    return folder / "checkpoint.pt"


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


CFG = TrainConfig(epochs=2, batch_size=12, lr=0.1, val_fraction=0.25, seed=0)
HTR = TrainConfig(epochs=2, batch_size=12, lr=0.1, val_fraction=0.25, seed=0, htr_gamma=1e-2)


def test_the_digest_is_of_the_content_and_survives_a_save_and_load(tmp_path):
    payload = {"model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2,
                                                                              dtype=torch.bfloat16)},
               "epoch": 3, "metrics": [{"epoch": 1, "acc": 0.5, "none": None}],
               "rng": capture_rng_state(), "names": ("a", "b"), "flag": True,
               "bit_exactness": {"threads": 1}}  # kept as given
    digest = content_digest(payload)
    save_checkpoint(tmp_path / "c.pt", payload)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw[CHECKSUM_KEY]["sha256"] == digest == content_digest(raw)
    # every kind of change is seen: a last bit of a float, a bfloat16 value, an int, a key,
    # the order of keys, a tuple become a list, an int become a float or a bool
    changes = [
        lambda p: p["model"]["w"].view(torch.int32).__setitem__((1, 2), p["model"]["w"].view(
            torch.int32)[1, 2] ^ 1),
        lambda p: p["model"]["b"].__setitem__(0, 1.0),
        lambda p: p.__setitem__("epoch", 4),
        lambda p: p["metrics"][0].__setitem__("acc2", p["metrics"][0].pop("acc")),
        lambda p: p.__setitem__("model", dict(reversed(list(p["model"].items())))),
        lambda p: p.__setitem__("names", list(p["names"])),
        lambda p: p.__setitem__("epoch", 3.0),
        lambda p: p["metrics"][0].__setitem__("epoch", True),
    ]
    for i, change in enumerate(changes):
        copy = torch.load(tmp_path / "c.pt", weights_only=True)
        change(copy)
        assert content_digest(copy) != digest, i


def test_a_plain_state_dict_without_checksum_is_read_but_a_training_one_is_not(tmp_path):
    torch.save(nn.Linear(2, 3).state_dict(), tmp_path / "plain.pt")
    assert set(load_checkpoint(tmp_path / "plain.pt", model=nn.Linear(2, 3))) == {"weight",
                                                                                 "bias"}
    ckpt = _half_run(tmp_path / "run", CFG)
    raw = torch.load(ckpt, weights_only=True)
    del raw[CHECKSUM_KEY]
    torch.save(raw, tmp_path / "unsigned.pt")
    with pytest.raises(CheckpointError, match=r"unsigned\.pt: it carries no checksum"):
        load_checkpoint(tmp_path / "unsigned.pt")
    assert issubclass(CheckpointError, HesslensInputError)


@pytest.mark.parametrize(("change", "words"), [
    (lambda s: s.update(python="x"), "rng['python']"),
    (lambda s: s["python"].update(state=[*range(624), 700]), "rng['python']"),
    (lambda s: s["python"].update(gauss_next="x"), "rng['python']"),
    (lambda s: s["numpy"].update(kind="PCG64"), "rng['numpy']"),
    (lambda s: s["numpy"].update(pos=625), "rng['numpy']"),
    (lambda s: s["numpy"].update(keys=s["numpy"]["keys"][:10]), "rng['numpy']"),
    (lambda s: s["numpy"].update(keys=s["numpy"]["keys"].float()), "rng['numpy']"),
    (lambda s: s.update(torch=s["torch"].float()), "rng['torch']"),
    (lambda s: s.update(torch=torch.zeros(5056, dtype=torch.uint8)[:-8]), "rng['torch']"),
    (lambda s: s.update(cuda="x"), "rng['cuda']"),
    (lambda s: s.pop("numpy"), "lacks ['numpy']"),
])
def test_random_states_the_generators_would_refuse_are_named(change, words):
    state = capture_rng_state()
    assert check_rng_state(state) is None
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    change(state)
    problem = check_rng_state(state)
    assert problem is not None and words in problem
    after = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    assert before[0] == after[0] and (before[1] == after[1]).all() and torch.equal(before[2],
                                                                                   after[2])


@pytest.mark.parametrize(("state", "words"), [
    ({"0.weight": torch.zeros(6, 5)}, "lacks '0.bias'"),
    ({**_model().state_dict(), "extra": torch.zeros(1)}, "has 'extra' that the model does not"),
    ({**_model().state_dict(), "0.weight": torch.zeros(6, 5, dtype=torch.long)},
     "0.weight is torch.int64"),
    ({**_model().state_dict(), "2.bias": torch.tensor([0.0, float("inf")])},
     "2.bias holds NaN or infinite"),
    ({"0.weight": [1.0]}, "not a state_dict"),
])
def test_weights_that_do_not_fit_the_model_are_named(state, words):
    with pytest.raises(CheckpointError, match=words):
        check_state_dict(state, _model(), "c.pt")


def _resume_fails(folder, cfg, change, words):
    """Edit the checkpoint (checksum forged), resume: CheckpointError, the folder as it was."""
    path = folder / "checkpoint.pt"
    raw = torch.load(path, weights_only=True)
    change(raw)
    save_checkpoint(path, raw)
    before = _files(folder)
    with pytest.raises(CheckpointError, match=words) as err:
        train(cfg, folder, progress=False, resume=True, model=_model(), dataset=_data())
    assert str(path) in str(err.value) and len(str(err.value).splitlines()) == 1
    assert _files(folder) == before


@pytest.mark.parametrize(("change", "words"), [
    (lambda c: c.update(penalty=None), "no Hessian-trace penalty state"),
    (lambda c: c["penalty"].update(generator=torch.zeros(3)), "'penalty' is not"),
    (lambda c: c["penalty"].update(seed="x"), "'penalty' is not"),
    (lambda c: c.update(world_size=2), "1 per-process random states for world_size 2"),
    (lambda c: c["metrics"].append({"epoch": 2}), r"records of epochs \[1, 2\]"),
    (lambda c: c.update(metrics=[]), r"records of epochs \[\]"),
    (lambda c: c["metrics"].__setitem__(0, "x"), r"metrics\[0\] is not an epoch record"),
    (lambda c: c["optimizer"]["param_groups"][0].update(momentum=0.5),
     "optimizer's momentum is 0.5"),
    (lambda c: c["optimizer"]["state"][1].update(momentum_buffer=torch.full((6,), float("nan"))),
     "momentum_buffer of parameter 1 holds NaN"),
    (lambda c: c["optimizer"]["state"].update({9: {}}), "names parameter 9"),
    (lambda c: c["scheduler"].update(last_epoch=0), "schedule stands at epoch 0"),
    (lambda c: c.update(config="htr"), "'config' is a str"),
    (lambda c: c["model"].update({"0.weight": c["model"]["0.weight"].double()}),
     "0.weight is torch.float64 in the checkpoint, torch.float32 in the model"),
    # found by editing random parts of a checkpoint (checksum forged) and resuming
    (lambda c: c["scheduler"]["milestones"].__setitem__(1, 9), "scheduler's milestones"),
    (lambda c: c["scheduler"].update(_last_lr=[0.5]), "last learning rates"),
    (lambda c: c["optimizer"]["state"][0].update(momentum_buffer=3), "is a int, not a tensor"),
    (lambda c: c["optimizer"]["param_groups"][0].pop("lr"), "learning rate .* is None"),
    (lambda c: c["optimizer"]["param_groups"][0].update(foreach="x"), "foreach is 'x'"),
    (lambda c: c["metrics"][0].update(test_loss="low"), r"metrics\[0\]\['test_loss'\]"),
    (lambda c: c["penalty"].update(device="tpu"), "'penalty' is not"),
])
def test_a_penalised_run_refuses_edited_checkpoints_and_leaves_its_folder(tmp_path, change,
                                                                           words):
    _half_run(tmp_path / "run", HTR)
    _resume_fails(tmp_path / "run", HTR, change, words)


def test_the_checks_accept_what_the_trainer_writes(tmp_path):
    path = _half_run(tmp_path / "run", HTR)
    ckpt = load_checkpoint(path, model=_model(), epochs=2, training=True)
    check_training_checkpoint(ckpt, path, epochs=2, model=_model())
    with pytest.raises(CheckpointError, match="epoch 1 is outside \\[0, 0\\]"):
        check_training_checkpoint(ckpt, path, epochs=0)
    result = train(HTR, tmp_path / "run", progress=False, resume=True, model=_model(),
                   dataset=_data())
    assert [r["epoch"] for r in result["epochs"]] == [1, 2]
