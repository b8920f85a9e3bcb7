"""What a checkpoint must be, checked before anything uses it: the structure of a training
checkpoint (:data:`TRAINING_KEYS`), random-number states the generators accept, weights and
optimizer and scheduler states that fit the run (shapes, dtypes, finite values, the
configuration's hyperparameters and schedule). :func:`hesslens.training.checkpoint.load_checkpoint`
applies them after its checksum; each ``*_problem`` function returns what is wrong as words
for a one-line error, or ``None``.

Example:
    >>> from torch import nn
    >>> from hesslens.training.checkpoint import capture_rng_state
    >>> check_rng_state(capture_rng_state()) is None
    True
    >>> state_dict_problem(nn.Linear(3, 2).state_dict(), nn.Linear(2, 2))
    'size mismatch for weight: shape (2, 3) in the checkpoint, (2, 2) in the model ...'
"""

from __future__ import annotations

import math
import numbers
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from hesslens.errors import CheckpointError

__all__ = [
    "CHECKPOINT_FORMAT",
    "TRAINING_KEYS",
    "check_fit",
    "check_rng_state",
    "check_state_dict",
    "check_training_checkpoint",
    "fit_problem",
    "state_dict_problem",
    "training_checkpoint_problem",
]

PathLike = str | os.PathLike[str]

#: The layout version of the training checkpoints :func:`hesslens.training.train` writes (2: with
#: a checksum).
CHECKPOINT_FORMAT = 2

#: The fix every checkpoint error ends with.
_FIX = "use an intact copy, or start the run again in a new folder"


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_rng_state(state: Any, what: str = "rng") -> str | None:
    """What is wrong with a :func:`capture_rng_state` state, or ``None`` if every generator
    accepts it (each part is tried on a scratch generator; the global ones are not touched).

    >>> from hesslens.training.checkpoint import capture_rng_state
    >>> check_rng_state(capture_rng_state()) is None
    True
    >>> check_rng_state({"python": {}, "numpy": {}, "torch": torch.zeros(3), "cuda": []})
    "rng['python'] is not a Python random state (version, 625 ints, gauss_next)"
    """
    if not isinstance(state, Mapping):
        return f"{what} is a {type(state).__name__}, not a random-number state"
    missing = [k for k in ("python", "numpy", "torch") if k not in state]
    if missing:
        return f"{what} lacks {missing}"
    py = state["python"]
    try:
        ok = (isinstance(py, Mapping) and _is_int(py.get("version"))
              and isinstance(py.get("state"), (list, tuple)) and len(py["state"]) == 625
              and all(_is_int(v) for v in py["state"])
              and (py.get("gauss_next") is None or _is_num(py.get("gauss_next"))))
        if ok:
            random.Random().setstate((int(py["version"]), tuple(int(v) for v in py["state"]),
                                      py["gauss_next"]))
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        return f"{what}['python'] is not a Python random state (version, 625 ints, gauss_next)"
    n = state["numpy"]
    keys = n.get("keys") if isinstance(n, Mapping) else None
    ok = (isinstance(n, Mapping) and n.get("kind") == "MT19937"
          and isinstance(keys, torch.Tensor) and keys.dtype == torch.int64
          and tuple(keys.shape) == (624,) and bool(((keys >= 0) & (keys < 2**32)).all())
          and _is_int(n.get("pos")) and 0 <= n["pos"] <= 624
          and n.get("has_gauss") in (0, 1) and _is_num(n.get("cached_gaussian")))
    if ok:
        try:
            np.random.RandomState().set_state(
                ("MT19937", keys.numpy().astype(np.uint32), int(n["pos"]),
                 int(n["has_gauss"]), float(n["cached_gaussian"])))
        except (TypeError, ValueError):
            ok = False
    if not ok:
        return (f"{what}['numpy'] is not a numpy MT19937 state (624 32-bit keys as an int64 "
                "tensor, pos in [0, 624], has_gauss, cached_gaussian)")
    t = state["torch"]
    if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1):
        return f"{what}['torch'] is not a torch generator state (a 1-D uint8 tensor)"
    try:
        torch.Generator().set_state(t)
    except (RuntimeError, TypeError, ValueError):
        return f"{what}['torch'] is not a state torch's CPU generator accepts"
    cuda = state.get("cuda", [])
    if not isinstance(cuda, (list, tuple)) or not all(
            isinstance(c, torch.Tensor) and c.dtype == torch.uint8 for c in cuda):
        return f"{what}['cuda'] is not a list of CUDA generator states (uint8 tensors)"
    return None


# ---------------------------------------------------------------------- fit to the run
def check_fit(ckpt: Mapping[str, Any], path: PathLike, model: nn.Module,
              optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None) -> None:
    """Raise a :class:`~hesslens.errors.CheckpointError` unless the states of the (already
    loaded and checked) training checkpoint ``ckpt`` fit ``model``, ``optimizer`` and
    ``scheduler`` (:func:`fit_problem`), for callers that first check what else the
    checkpoint must agree on (the trainer: the configuration)."""
    problem = fit_problem(ckpt, model, optimizer, scheduler)
    if problem is not None:
        raise CheckpointError(f"checkpoint {os.fspath(path)}: {problem}; {_FIX}")


def fit_problem(ckpt: Any, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                scheduler: Any = None) -> str | None:
    """What keeps a checkpoint's states from loading into ``model`` (and ``optimizer`` and
    ``scheduler``), or ``None``: its weights (``ckpt["model"]``, or ``ckpt`` itself, a plain
    state dict: :func:`state_dict_problem`) and, for a training checkpoint (one with a
    ``"format"``), the exact dtypes of the model's tensors (a run resumes in the precision it
    was trained in), its optimizer state (shapes against the parameters, finite values, the
    configuration's hyperparameters) and its scheduler's (the configuration's schedule).

    >>> fit_problem(nn.Linear(2, 3).state_dict(), nn.Linear(2, 3)) is None
    True
    """
    if not isinstance(ckpt, Mapping):
        return f"it holds a {type(ckpt).__name__}, not a state_dict"
    training = "format" in ckpt
    state = ckpt.get("model") if training or isinstance(ckpt.get("model"), Mapping) else ckpt
    problem = state_dict_problem(state, model, exact_dtype=training)
    if problem is None and training and isinstance(ckpt.get("optimizer"), Mapping):
        problem = _optimizer_problem(ckpt["optimizer"], optimizer, model)
    if problem is None and training and scheduler is not None and isinstance(
            ckpt.get("scheduler"), Mapping):
        problem = _scheduler_problem(ckpt["scheduler"], ckpt["optimizer"]["param_groups"],
                                     scheduler)
    return problem


def check_state_dict(state: Any, model: nn.Module, path: PathLike | None = None) -> None:
    """Raise a :class:`~hesslens.errors.CheckpointError` unless ``state`` fits ``model``:
    the same names, each tensor of the model's shape and a dtype it can take, float values
    finite. Called before ``model.load_state_dict``, whose errors are long and name no file.

    >>> m = nn.Linear(2, 3)
    >>> check_state_dict(nn.Linear(2, 3).state_dict(), m)
    >>> check_state_dict(nn.Linear(3, 3).state_dict(), m, "c.pt")
    Traceback (most recent call last):
    ...
    hesslens.errors.CheckpointError: checkpoint c.pt: size mismatch for weight: shape (3, 3) ...
    """
    problem = state_dict_problem(state, model)
    if problem is not None:
        where = f"checkpoint {os.fspath(path)}" if path is not None else "the state dict"
        raise CheckpointError(f"{where}: {problem}")


def state_dict_problem(state: Any, model: nn.Module, exact_dtype: bool = False) -> str | None:
    """What keeps ``state`` from loading into ``model`` (:func:`check_state_dict`), or
    ``None``. ``exact_dtype``: each tensor must have the model's dtype (else a float tensor of
    any float dtype will do: ``load_state_dict`` converts it)."""
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        return "its model state is not a state_dict (names -> tensors)"
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks {_few(missing)}")
        if extra:
            parts.append(f"has {_few(extra)} that the model does not")
        return (f"its weights do not fit the model ({type(model).__name__}): it "
                f"{' and '.join(parts)}")
    for k, ref in want.items():
        got = state[k]
        if tuple(got.shape) != tuple(ref.shape):
            return (f"size mismatch for {k}: shape {tuple(got.shape)} in the checkpoint, "
                    f"{tuple(ref.shape)} in the model (another architecture or size)")
        if got.is_floating_point() != ref.is_floating_point() or got.is_complex() or (
                exact_dtype and got.dtype != ref.dtype):
            return (f"{k} is {got.dtype} in the checkpoint, {ref.dtype} in the model (give the "
                    "model the dtype it was trained in)")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            return f"{k} holds NaN or infinite values"
    return None


def _few(names: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


# ---------------------------------------------------------------------- training checkpoints
#: The parts of a training checkpoint (``hesslens.training.train`` writes them) and what each
#: must be.
TRAINING_KEYS = {
    "format": "an int", "config": "a dictionary", "epoch": "an int", "global_step": "an int",
    "model": "a state_dict", "optimizer": "an optimizer state_dict",
    "scheduler": "a scheduler state_dict", "penalty": "a penalty state or None",
    "rng": "a random-number state", "rng_ranks": "a list of random-number states",
    "world_size": "an int", "metrics": "a list of epoch records",
}


def check_training_checkpoint(ckpt: Any, path: PathLike, epochs: int | None = None,
                              optimizer: torch.optim.Optimizer | None = None,
                              model: nn.Module | None = None) -> None:
    """Raise a :class:`~hesslens.errors.CheckpointError` unless ``ckpt`` has the structure of
    a hesslens training checkpoint: every part of :data:`TRAINING_KEYS` of its type, ``epoch``
    in ``[0, epochs]`` (default: the saved configuration's), the trained metric records those
    of epochs ``1 .. epoch``, the schedule at that epoch, random-number states every generator
    accepts, and optimizer state of finite values that fits ``optimizer``'s parameters (or
    ``model``'s)."""
    if isinstance(ckpt, Mapping):
        problem = training_checkpoint_problem(ckpt, epochs, optimizer, model)
    else:
        problem = f"holds a {type(ckpt).__name__}, not a training checkpoint"
    if problem is not None:
        raise CheckpointError(f"checkpoint {os.fspath(path)}: {problem}")


def training_checkpoint_problem(ckpt: Mapping[str, Any], epochs: int | None,
                      optimizer: torch.optim.Optimizer | None,
                      model: nn.Module | None) -> str | None:
    missing = [k for k in TRAINING_KEYS if k not in ckpt]
    if "format" in ckpt and ckpt["format"] != CHECKPOINT_FORMAT and _is_int(ckpt["format"]):
        if ckpt["format"] < CHECKPOINT_FORMAT:
            return (f"it is of format {ckpt['format']}, written by an older hesslens without a "
                    f"checksum (this one reads format {CHECKPOINT_FORMAT}), so its content "
                    "cannot be vouched for")
        return (f"it is of format {ckpt['format']}, newer than this hesslens reads "
                f"({CHECKPOINT_FORMAT}): update hesslens")
    if missing:
        return (f"it is not a hesslens training checkpoint: it lacks {_few(missing)} "
                f"(it has {_few(sorted(map(str, ckpt)))})")
    types = {"format": _is_int, "epoch": _is_int, "global_step": _is_int,
             "world_size": _is_int, "config": lambda v: isinstance(v, Mapping),
             "optimizer": lambda v: isinstance(v, Mapping),
             "scheduler": lambda v: isinstance(v, Mapping),
             "penalty": lambda v: v is None or isinstance(v, Mapping),
             "metrics": lambda v: isinstance(v, list), "rng_ranks": lambda v: isinstance(v, list),
             "model": lambda v: isinstance(v, Mapping)}
    for key, ok in types.items():
        if not ok(ckpt[key]):
            return f"its {key!r} is a {type(ckpt[key]).__name__}, not {TRAINING_KEYS[key]}"
    epoch = ckpt["epoch"]
    if epochs is None:
        saved = ckpt["config"].get("epochs")
        epochs = saved if _is_int(saved) else None
    if epoch < 0 or (epochs is not None and epoch > epochs):
        limit = f"[0, {epochs}]" if epochs is not None else "[0, epochs]"
        return (f"its epoch {epoch} is outside {limit}, the epochs of its run's configuration")
    if ckpt["global_step"] < 0:
        return f"its global_step {ckpt['global_step']} is negative"
    if ckpt["world_size"] < 1:
        return f"its world_size {ckpt['world_size']} is not a positive number of processes"
    problem = _metrics_problem(ckpt["metrics"], epoch)
    if problem is not None:
        return problem
    problem = check_rng_state(ckpt["rng"], "rng")
    if problem is not None:
        return problem
    if len(ckpt["rng_ranks"]) != ckpt["world_size"]:
        return (f"it holds {len(ckpt['rng_ranks'])} per-process random states for world_size "
                f"{ckpt['world_size']}")
    for r, state in enumerate(ckpt["rng_ranks"]):
        problem = check_rng_state(state, f"rng_ranks[{r}]")
        if problem is not None:
            return problem
    last = ckpt["scheduler"].get("last_epoch", epoch)
    if not _is_int(last) or last != epoch:
        return (f"its learning-rate schedule stands at epoch {last!r}, not at its epoch {epoch} "
                "(the trainer steps it once an epoch)")
    problem = _penalty_problem(ckpt["penalty"])
    if problem is not None:
        return problem
    problem = _optimizer_problem(ckpt["optimizer"], optimizer, model)
    if problem is None:
        problem = _scheduler_problem(ckpt["scheduler"], ckpt["optimizer"]["param_groups"], None)
    return problem


#: The numbers of an epoch record (``None`` where not measured).
_RECORD_NUMBERS = ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss",
                   "test_acc", "htr_penalty", "htr_steps", "epoch_seconds", "eval_seconds",
                   "tracking_seconds", "trace", "trace_stderr", "top_eigenvalue")


def _metrics_problem(metrics: list[Any], epoch: int) -> str | None:
    for i, r in enumerate(metrics):
        if not isinstance(r, Mapping) or not _is_int(r.get("epoch")):
            return f"its metrics[{i}] is not an epoch record (a dictionary with an int 'epoch')"
        bad = [k for k in _RECORD_NUMBERS if not (r.get(k) is None or _is_num(r[k]))]
        if bad:
            return f"its metrics[{i}][{bad[0]!r}] is {r[bad[0]]!r}, not a number"
    trained = [int(r["epoch"]) for r in metrics if r["epoch"] != 0]
    initial = [i for i, r in enumerate(metrics) if r["epoch"] == 0]
    if trained != list(range(1, epoch + 1)) or initial not in ([], [0]):
        shown = [r["epoch"] for r in metrics]
        return (f"its metrics hold the records of epochs {shown[:8]}"
                f"{'...' if len(shown) > 8 else ''}, not those of epochs 1..{epoch} that its "
                f"epoch {epoch} says were trained")
    return None


def _penalty_problem(state: Mapping[str, Any] | None) -> str | None:
    if state is None:
        return None
    gen = state.get("generator")
    ok = (_is_int(state.get("seed")) and _is_int(state.get("draws", 0))
          and (gen is None or (isinstance(gen, torch.Tensor) and gen.dtype == torch.uint8))
          and isinstance(state.get("recent", []), (list, tuple))
          and all(_is_num(v) for v in state.get("recent", [])))
    device = state.get("device")
    ok = ok and (device is None or (isinstance(device, str) and device.split(":")[0] in (
        "cpu", "cuda", "mps")))
    if ok and gen is not None and device in (None, "cpu"):
        try:
            torch.Generator().set_state(gen)
        except (RuntimeError, TypeError, ValueError):
            ok = False
    if not ok:
        return ("its 'penalty' is not a Hessian-trace penalty state (seed, probe generator "
                "state, draws, recent values)")
    return None


def _optimizer_problem(saved: Mapping[str, Any], optimizer: torch.optim.Optimizer | None,
                       model: nn.Module | None) -> str | None:
    """What is wrong with a saved optimizer state: its structure, finite values, and the
    shapes of its per-parameter tensors against ``optimizer``'s parameters (or, without one,
    ``model``'s trainable parameters in order, as the trainer gives them to its optimizer)."""
    groups, state = saved.get("param_groups"), saved.get("state")
    if not (isinstance(groups, list) and isinstance(state, Mapping) and all(
            isinstance(g, Mapping) and isinstance(g.get("params"), list)
            and all(_is_int(i) for i in g["params"]) for g in groups)):
        return "its 'optimizer' is not an optimizer state_dict (state, param_groups)"
    ids = [int(i) for g in groups for i in g["params"]]
    for pid, entry in state.items():
        if pid not in ids or not isinstance(entry, Mapping):
            return f"its optimizer state names parameter {pid!r}, which no parameter group has"
        for name, value in entry.items():
            if not (value is None or isinstance(value, torch.Tensor)
                    or (name == "step" and _is_num(value))):
                return (f"its optimizer state {name} of parameter {pid} is a "
                        f"{type(value).__name__}, not a tensor")
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(
                    torch.isfinite(value).all()):
                return f"its optimizer state {name} of parameter {pid} holds NaN or infinite values"
    for i, g in enumerate(groups):
        lr = g.get("lr")
        if not (_is_num(lr) and math.isfinite(lr) and lr >= 0):  # a cosine schedule ends at 0
            return (f"its optimizer's learning rate (group {i}) is {lr!r}, not a number "
                    ">= 0")
    if optimizer is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        sizes = [len(g["params"]) for g in optimizer.param_groups]
    elif model is not None:
        params = [p for p in model.parameters() if p.requires_grad]
        sizes = [len(params)]
    else:
        return None
    if [len(g["params"]) for g in groups] != sizes:
        return (f"its optimizer has parameter groups of {[len(g['params']) for g in groups]} "
                f"parameters, the model's {sizes}")
    for pid, entry in state.items():
        p = params[ids.index(pid)]
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                return (f"its optimizer state {name} of parameter {pid} has shape "
                        f"{tuple(value.shape)}, the parameter {tuple(p.shape)}")
    if optimizer is None:
        return None
    now = optimizer.state_dict()["param_groups"]
    for i, (g, h) in enumerate(zip(groups, now)):
        for key, value in h.items():
            if key in ("params", "lr", "initial_lr"):
                continue
            if _is_num(value) and not (_is_num(g.get(key)) and math.isclose(g[key], value)):
                return (f"its optimizer's {key} is {g.get(key)!r} (group {i}), the "
                        f"configuration's {value!r}")
            if (value is None or isinstance(value, bool)) and key in g and not (
                    g[key] is None or isinstance(g[key], bool)):
                return f"its optimizer's {key} is {g[key]!r} (group {i}), not a flag"
    return None


#: Scheduler state that moves as the run goes on; the rest follows from the configuration.
_SCHEDULER_RUNNING = ("last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step",
                      "_is_initial", "verbose")


def _scheduler_problem(saved: Mapping[str, Any], groups: list[Any],
                       scheduler: Any | None) -> str | None:
    """What is wrong with a saved learning-rate scheduler state: its last rates must be the
    optimizer's (positive numbers, one per group), and, given the run's ``scheduler`` (built
    from the same configuration), everything not :data:`_SCHEDULER_RUNNING` must be its."""
    last = saved.get("_last_lr")
    if last is not None and (not isinstance(last, list) or len(last) != len(groups) or any(
            not _is_num(v) or v != g.get("lr") for v, g in zip(last, groups))):
        return (f"its scheduler's last learning rates {last!r} are not its optimizer's "
                f"{[g.get('lr') for g in groups]}")
    if scheduler is None:
        return None
    for key, value in scheduler.state_dict().items():
        if key in _SCHEDULER_RUNNING:
            continue
        if key not in saved or saved[key] != value:
            return (f"its scheduler's {key} is {saved.get(key)!r}, the configuration's "
                    f"{value!r}")
    return None
