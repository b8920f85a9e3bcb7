"""Sharpness while you train: the top Hessian eigenvalues against the optimizer's edge of
stability, a few products a measurement.

:class:`SharpnessRecorder` measures, on a fixed set of data, at the model's current weights:

* ``sharpness``: the top eigenvalue of the Hessian (``eigenvalues``: the top ``k``, with their
  a-posteriori error ``bounds``);
* ``threshold``: the optimizer's stability threshold, read from the optimizer object
  (:mod:`hesslens.analysis.thresholds`: ``2/lr``, ``(2 + 2β)/lr`` with momentum, Nesterov's,
  Adam's ``(2 + 2β1)/((1 - β1) lr)``), and ``compared``, the quantity it bounds:
  ``sharpness``, or ``preconditioned_sharpness``, ``λ1(P^(-1/2) H P^(-1/2))`` with Adam's
  preconditioner ``P`` from its state (:class:`hesslens.curvature.preconditioned.Preconditioned`);
  ``ratio`` is that quantity over the threshold (1: the edge of stability);
* ``directional_sharpness``: ``uᵀ H u / uᵀ u`` along the optimizer's last update ``u`` (one
  product; ``u`` is the parameters now minus just before the last ``optimizer.step()``, copied
  by a step pre-hook only before a step that a record follows);
* ``gradient_share``: ``|V_kᵀ g|² / |g|²``, the share of the gradient's squared norm in the
  top-``k`` eigenspace (Gur-Ari et al. 2018, "Gradient Descent Happens in a Tiny Subspace"), with
  ``g`` the gradient on the monitor's data; ``loss`` and ``gradient_norm`` beside it;
* ``overlap``: ``|⟨v1, v1_prev⟩|``, how far the top eigenvector turned since the last record.

Each record is cheap: the curvature operator is built once and takes the model's new
parameters at each record (``reload_parameters``: no new copy of the model, no new data checks),
and the eigenvalues start from the previous record's eigenvectors (``eigsh(v0=...)``).
``n_hvp`` counts every Hessian product of a record. Recording never changes training: the
products run on the operator's private copy, and the random states and train/eval modes are put
back as the curvature tracker does.

``hl.SharpnessMonitor`` (:class:`hesslens.report.sharpness.SharpnessMonitor`) is this recorder
with ``write_report``; the analysis layer holds no figure code.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> mon = SharpnessRecorder(model, nn.functional.cross_entropy, (x, y), opt, every=2)
    >>> for step in range(4):
    ...     opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward(); opt.step()
    ...     _ = mon.update(step)
    >>> [r["step"] for r in mon.history], round(mon.history[-1]["threshold"], 6)
    ([0, 2], 38.0)
    >>> rec = mon.history[-1]
    >>> rec["sharpness"] > 0 and 0 <= rec["gradient_share"] <= 1 and 0 <= rec["overlap"] <= 1
    True
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hesslens.analysis.history import HistoryFiles, HistoryRecorder
from hesslens.analysis.thresholds import (
    StabilityRule,
    preconditioner,
    stability_rule,
    unwrap_optimizer,
)
from hesslens.analysis.tracker import untouched_state
from hesslens.checks import check_positive_int, check_seed
from hesslens.curvature import CurvatureOperator, Hessian
from hesslens.curvature.base import unwrap_model
from hesslens.curvature.preconditioned import Preconditioned
from hesslens.errors import BudgetWarning, HesslensInputError

__all__ = ["FILES", "SCALARS", "SCHEMA", "SHARPNESS_CSV", "SHARPNESS_JSON", "SharpnessRecorder",
           "flat_row"]

#: Identifier of the layout of ``sharpness.json``.
SCHEMA = "hesslens.sharpness_history/1"
SHARPNESS_JSON = "sharpness.json"
SHARPNESS_CSV = "sharpness.csv"

#: The numbers of a record that the framework callbacks send to the loggers.
SCALARS = ("sharpness", "threshold", "ratio", "preconditioned_sharpness",
           "directional_sharpness", "gradient_share", "overlap", "loss", "n_hvp", "seconds")


def flat_row(rec: Mapping[str, Any]) -> dict[str, Any]:
    """One CSV row of a record (lists as their first value, the whole list beside it)."""
    row: dict[str, Any] = {}
    for key, value in rec.items():
        if isinstance(value, (list, tuple)):
            row[key] = list(value)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                row[f"{key}.{k}"] = v
        else:
            row[key] = value
    return row


#: The monitor's files: ``sharpness.json`` and ``sharpness.csv``.
FILES = HistoryFiles(SHARPNESS_JSON, SHARPNESS_CSV, SCHEMA, "sharpness", flat_row)


class SharpnessRecorder(HistoryRecorder):
    """Record the sharpness against the optimizer's edge of stability: call :meth:`update` in
    the training loop, after ``optimizer.step()``.

    Args:
        model: the network being trained (read, never changed).
        loss_fn: ``loss_fn(outputs, targets)`` -> mean loss (or ``None`` for a model that
            computes its own loss), as for :class:`hesslens.Hessian`.
        data: the fixed data the curvature is measured on (``(inputs, targets)`` or an
            iterable of batches; keep it fixed: no shuffling, no augmentation). Under
            ``torch.distributed`` each rank passes its shard, as to the operators.
        optimizer: the ``torch.optim`` optimizer that trains ``model`` (framework wrappers are
            unwrapped), or ``None`` to record the sharpness without a threshold.
        every: record on calls ``1, every + 1, 2 every + 1, ...`` of :meth:`update`.
        k: top eigenvalues per record (``k=1``: the sharpness alone).
        out: a folder; ``sharpness.json`` and ``sharpness.csv`` are rewritten atomically after
            every record (by rank 0 alone under ``torch.distributed``). A folder that holds a
            history continues it; a record whose step is not after the last one replaces the
            records from that step on (a resumed run).
        tol: relative a-posteriori error bound of the eigenvalues (:func:`hesslens.linalg.eigsh`).
        seed: seed of the first record's start vector.
        warm_start: start each record's eigenvalues from the previous record's eigenvectors.
        direction: record the directional sharpness along the last update (one product; a
            step pre-hook on the optimizer copies the parameters before a step a record
            follows).
        eval_mode: measure in eval mode (dropout off); the modes are restored afterwards.
        hessian_options: more keyword arguments for :class:`hesslens.Hessian` (``path``
            defaults to ``"reverse"``).

    Attributes:
        history: the records, oldest first (see the module docstring for the keys).
        rule: the optimizer's :class:`~hesslens.analysis.thresholds.StabilityRule` at the last
            record.
        keep_next_step: ``None`` (default: when the next :meth:`update` records), ``True`` or
            ``False``: whether the step pre-hook copies the parameters before the next step.
    """

    files = FILES
    measured_keys = frozenset({
        "sharpness", "eigenvalues", "bounds", "converged", "overlap", "loss", "gradient_norm",
        "gradient_share", "directional_sharpness", "optimizer", "lr", "threshold", "compared",
        "preconditioned_sharpness", "preconditioned_bound", "ratio", "n_hvp", "n_hvp_sharpness",
        "n_hvp_preconditioned", "seconds"})

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        optimizer: torch.optim.Optimizer | None,
        every: int = 1,
        k: int = 1,
        out: str | Path | None = None,
        *,
        tol: float = 1e-4,
        seed: int = 0,
        warm_start: bool = True,
        direction: bool = True,
        eval_mode: bool = True,
        hessian_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise HesslensInputError(
                f"model must be a torch.nn.Module, got {type(model).__name__}")
        optimizer = None if optimizer is None else unwrap_optimizer(optimizer)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise HesslensInputError(
                f"optimizer must be a torch.optim.Optimizer (or None), got "
                f"{type(optimizer).__name__}")
        if not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and tol > 0):
            raise HesslensInputError(f"tol must be a positive number, got {tol!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.optimizer = optimizer
        self.k = check_positive_int(k, "k")
        self.tol = float(tol)
        self.seed = check_seed(seed)
        self.warm_start = bool(warm_start)
        self.direction = bool(direction)
        self.eval_mode = bool(eval_mode)
        self.hessian_options = {"path": "reverse", **dict(hessian_options or {})}
        self.rule: StabilityRule | None = None
        self._op: CurvatureOperator | None = None
        self._previous: torch.Tensor | None = None  # last record's eigenvectors
        self._pprevious: torch.Tensor | None = None  # ... of the preconditioned matrix
        self._before: dict[str, torch.Tensor] = {}  # parameters before the last step
        self._captured = False
        self._hook = None
        self._warned = False
        module = unwrap_model(model)
        self._named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not self._named:
            raise HesslensInputError(
                "the model has no trainable parameters (all have requires_grad=False): there "
                "is no sharpness to record")
        if optimizer is not None:
            stability_rule(optimizer, [p for _, p in self._named], warn=False)  # fail early
            if self.direction:
                self._hook = optimizer.register_step_pre_hook(self._before_step)
        #: Whether to copy the parameters before the next optimizer step (for the next
        #: record's update direction): ``None`` (default) copies when the next :meth:`update`
        #: records; a loop that calls :meth:`record` itself may set it before each step.
        self.keep_next_step: bool | None = None
        super().__init__(out, every)

    # ------------------------------------------------------------------ the loop
    def close(self) -> None:
        """Remove the optimizer hook and give back the lock of ``out`` (the recorder keeps its
        history; a new one on the folder continues it)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        super().close()

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Step pre-hook: keep the parameters as they are before a step a record follows."""
        if not (self.due() if self.keep_next_step is None else self.keep_next_step):
            return
        with torch.no_grad():
            for name, p in self._named:
                buf = self._before.get(name)
                if buf is None or buf.shape != p.shape or buf.device != p.device:
                    self._before[name] = p.detach().clone()
                else:
                    buf.copy_(p.detach())
        self._captured = True

    # ------------------------------------------------------------------ measurement
    def _operator(self) -> CurvatureOperator:
        if self._op is None:
            self._op = Hessian(self.model, self.loss_fn, self.data, **self.hessian_options)
            names = [n for n, _ in self._named]
            if self._op.parameter_names != names:
                raise HesslensInputError(
                    "the curvature operator's parameters are not the model's trainable ones "
                    "in order; pass the model itself (not a part of it)")
        else:
            self._op.reload_parameters(self.model)
        return self._op

    def _flat(self, tensors: Mapping[str, torch.Tensor], op: CurvatureOperator) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1) for n, _ in self._named]).to(
            device=op.device, dtype=op.dtype)

    def measure(self) -> dict[str, Any]:
        """The measurement at the model's current weights, without filing it."""
        t0 = time.perf_counter()
        with untouched_state(self.model, self.eval_mode), torch.no_grad():
            op = self._operator()
            n0 = op.n_products
            top = self._top(op, self._previous if self.warm_start else None)
            n_top = op.n_products - n0
            V = top.vectors.to(torch.float64)
            rec: dict[str, Any] = {
                "sharpness": float(top.values[0]),
                "eigenvalues": [float(v) for v in top.values],
                "bounds": None if top.bounds is None else [float(b) for b in top.bounds],
                "converged": bool(top.converged.all()),
                "overlap": (None if self._previous is None
                            else abs(float(V[0] @ self._previous[0].to(V)))),
            }
            with torch.enable_grad():
                loss, grad = op.loss_and_gradient()
            g = grad.to(torch.float64)
            g2 = float(g @ g)
            rec["loss"] = float(loss)
            rec["gradient_norm"] = math.sqrt(g2)
            rec["gradient_share"] = float(((V @ g) ** 2).sum()) / g2 if g2 > 0 else None
            rec["directional_sharpness"] = self._directional(op)
            rec.update(self._stability(op, rec["sharpness"]))
            # the preconditioned operator counts its own products (rec["n_hvp_preconditioned"])
            rec["n_hvp"] = int(op.n_products - n0) + rec.get("n_hvp_preconditioned", 0)
            rec["n_hvp_sharpness"] = int(n_top)
        self._previous = top.vectors
        rec["seconds"] = time.perf_counter() - t0
        return rec

    def _top(self, op: Any, start: torch.Tensor | None, k: int | None = None) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BudgetWarning)  # the record says converged=False
            # the operator's memory budget sizes the basis (a few vectors on a large model);
            # the vectors are wanted at once, for the next record's warm start
            return op.eigenvalues(k=k or self.k, tol=self.tol, seed=self.seed, v0=start,
                                  return_vectors=True)

    def _directional(self, op: CurvatureOperator) -> float | None:
        if not (self.direction and self._captured):
            return None
        self._captured = False
        u = self._flat({n: p.detach() - self._before[n] for n, p in self._named}, op)
        u64 = u.to(torch.float64)
        uu = float(u64 @ u64)
        if not uu > 0:
            return None
        Hu = op.matmat(u.unsqueeze(0))[0]
        return float(u64 @ Hu.to(torch.float64)) / uu

    def _stability(self, op: CurvatureOperator, sharpness: float) -> dict[str, Any]:
        out: dict[str, Any] = {"optimizer": None, "lr": None, "threshold": None,
                               "compared": "sharpness", "preconditioned_sharpness": None,
                               "ratio": None}
        if self.optimizer is None:
            return out
        rule = stability_rule(self.optimizer, [p for _, p in self._named],
                              warn=not self._warned)
        self._warned = True  # one warning for an optimizer without a known threshold
        self.rule = rule
        out.update(optimizer=rule.optimizer, lr=rule.lr, threshold=rule.threshold,
                   compared=rule.compared)
        value: float | None = sharpness
        if rule.compared == "preconditioned_sharpness":
            value = None
            pre = preconditioner(self.optimizer, self._named, rule)
            if pre is not None:  # Adam before its first step has no preconditioner yet
                P = Preconditioned(op, pre[0], pre[1])
                ptop = self._top(P, self._pprevious if self.warm_start else None, k=1)
                self._pprevious = ptop.vectors
                value = float(ptop.values[0])
                out["preconditioned_sharpness"] = value
                out["n_hvp_preconditioned"] = int(P.n_products)
                out["preconditioned_bound"] = (None if ptop.bounds is None
                                               else float(ptop.bounds[0]))
        threshold = rule.threshold
        if value is not None and threshold is not None and 0 < threshold < math.inf:
            out["ratio"] = value / threshold
        return out

    # ------------------------------------------------------------------ files
    def settings(self) -> dict[str, Any]:
        """What each record measured, as stored in ``sharpness.json``."""
        return {"every": self.every, "k": self.k, "tol": self.tol, "seed": self.seed,
                "warm_start": self.warm_start, "direction": self.direction,
                "eval_mode": self.eval_mode,
                "optimizer": None if self.optimizer is None else type(self.optimizer).__name__,
                "rule": None if self.rule is None else self.rule.to_dict(),
                "hessian_options": {k: str(v) for k, v in self.hessian_options.items()}}
