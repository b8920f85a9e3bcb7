"""The training configuration: one dataclass, saved with every run as ``config.json``.

An *arm* of a comparison is a configuration without its seed (and without where it ran, where
the data lay and what curvature was tracked: :data:`RUN_ONLY_FIELDS`); :func:`arm_key` and
:func:`arm_label` name it.

Example:
    >>> cfg = TrainConfig(epochs=5, htr_gamma=1e-3, htr_layers="middle")
    >>> cfg.validate().milestones_or_default()
    [2, 4]
    >>> arm_label(cfg)
    'SGD+HTR(1e-03, middle, hvp, every 1)'
    >>> TrainConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from hesslens.checks import check_seed
from hesslens.errors import HesslensInputError

__all__ = ["CURVATURES", "RUN_ONLY_FIELDS", "SCHEDULES", "TrainConfig", "arm_key", "arm_label"]

SCHEDULES = ("none", "multistep", "cosine")

#: The curvatures whose trace the penalty can take (``HessianTracePenalty(curvature=...)``).
CURVATURES = ("hessian", "gauss_newton", "fisher")

#: Fields that say how or where a run was made or what was measured along the way, not what was
#: trained: not part of an arm.
RUN_ONLY_FIELDS = ("seed", "device", "data_root", "track_every", "track_layers",
                   "track_per_class", "track_densities")


@dataclass
class TrainConfig:
    """Everything that determines a training run (with the seed, bit for bit on one device).

    The defaults suit MNIST-1D: the 1-D CNN with SGD (lr 0.2, momentum 0.9, batch 128, 30
    epochs, lr x 0.25 from epoch index 15 and again from 22) reaches about 92 % test accuracy in
    some 15 s on one CPU core (the MLP about 66 %); published baselines are 94 % and 68 %.

    Attributes:
        model, data: the labels the run is recorded under; for
            :func:`hesslens.experiments.train.train_zoo`, the zoo names it builds from
            (``hesslens.zoo.MODELS``, ``hesslens.zoo.DATASETS``).
        data_root: folder with the local files of the file-based data sets.
        epochs, batch_size, lr, momentum: SGD with (heavy-ball) momentum.
        weight_decay: the "L2" arm (SGD's coupled weight decay, ``lambda * w`` added to the
            gradient, i.e. an L2 penalty ``lambda / 2 ||w||^2``).
        schedule: ``"none"``, ``"multistep"`` (multiply by ``lr_gamma`` at each milestone
            epoch; the paper's MultiStepLR with factor 0.25) or ``"cosine"`` (to 0 over
            ``epochs``).
        milestones: 0-based indices of the epochs from which the multistep schedule's decays
            apply (PyTorch's ``MultiStepLR`` convention: milestone ``m`` means epochs
            ``m, m+1, ...`` run at the lower rate); ``None`` gives
            ``[round(epochs / 2), round(3 epochs / 4)]``.
        lr_gamma: the multistep decay factor.
        seed: initial weights, data order, validation split, probes; in ``[0, 2**32)``, the
            range numpy and scikit-learn take (:func:`hesslens.checks.check_seed`).
        htr_gamma: weight of the Hessian-trace penalty; 0 switches it off.
        htr_layers: ``"all"``, ``"middle"`` or a list of layer names.
        htr_every: apply the penalty on every k-th optimizer step (the paper: 50).
        htr_start: first epoch (0-based) with the penalty.
        htr_probes: probes per penalty evaluation.
        htr_method: ``"hvp"`` (double backward) or ``"fd"`` (finite differences).
        htr_distribution: ``"rademacher"`` or ``"gaussian"`` probes.
        htr_fd_eps: relative finite-difference step (``None``: the default for the dtype).
        htr_curvature: the matrix whose trace is penalised: ``"hessian"`` (the paper),
            ``"gauss_newton"`` (positive semi-definite) or ``"fisher"`` (the empirical Fisher,
            the mean squared per-sample gradient norm); see
            :class:`hesslens.training.penalty.HessianTracePenalty`.
        sam_rho: SAM's radius; 0 switches SAM off.
        track_every: record curvature every N epochs and after the last one; 0 switches
            tracking off (the default here; ``hesslens train`` tracks every epoch unless
            ``--track-every 0``). A trainer callback does the measuring
            (:mod:`hesslens.training.callbacks`): :func:`hesslens.training.train` refuses
            ``track_every > 0`` without one, and
            :func:`hesslens.experiments.train.train_zoo` wires the one ``track_layers`` names.
        track_layers: what ``track_every`` records: ``True`` (here), the full network's and
            every layer's trace and top eigenvalue, from initialisation (epoch 0) on
            (:class:`~hesslens.analysis.epoch_tracking.EpochTracking`); ``False`` (``hesslens
            train``'s default), the sharpness against the optimizer's threshold, a few products
            an epoch (:class:`~hesslens.analysis.epoch_sharpness.EpochSharpness`).
        track_per_class: examples per class in the fixed analysis subset (the paper: 10).
        track_densities: also record eigenvalue densities (slower).
        val_fraction: share of the training set held out for validation (0: none).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    """

    model: str = "cnn1d"
    data: str = "mnist1d"
    data_root: str | None = None
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "multistep"
    milestones: list[int] | None = None
    lr_gamma: float = 0.25
    seed: int = 0
    htr_gamma: float = 0.0
    htr_layers: str | list[str] = "all"
    htr_every: int = 1
    htr_start: int = 0
    htr_probes: int = 1
    htr_method: str = "hvp"
    htr_distribution: str = "rademacher"
    htr_fd_eps: float | None = None
    htr_curvature: str = "hessian"
    sam_rho: float = 0.0
    track_every: int = 0
    track_layers: bool = True
    track_per_class: int = 10
    track_densities: bool = False
    val_fraction: float = 0.1
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ checks
    def validate(self) -> TrainConfig:
        """Raise :class:`HesslensInputError` on any bad value; return ``self``."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise HesslensInputError(msg)

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need(isinstance(self.model, str) and bool(self.model),
             "model must be a non-empty label (a zoo model name for train_zoo)")
        need(isinstance(self.data, str) and bool(self.data),
             "data must be a non-empty label (a zoo data-set name for train_zoo)")
        need(is_int(self.epochs) and self.epochs >= 1,
             f"epochs must be a positive integer, got {self.epochs!r}")
        need(is_int(self.batch_size) and self.batch_size >= 1,
             f"batch_size must be a positive integer, got {self.batch_size!r}")
        need(is_num(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr!r}")
        need(is_num(self.momentum) and 0 <= self.momentum < 1,
             f"momentum must be in [0, 1), got {self.momentum!r}")
        need(is_num(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(self.schedule in SCHEDULES,
             f"unknown schedule {self.schedule!r}; use one of {list(SCHEDULES)}")
        if self.milestones is not None:
            need(isinstance(self.milestones, (list, tuple))
                 and all(is_int(m) and m >= 1 for m in self.milestones),
                 f"milestones must be a list of positive epoch numbers, got {self.milestones!r}")
            self.milestones = sorted(int(m) for m in self.milestones)
            late = [m for m in self.milestones if m >= self.epochs]
            need(not late,
                 f"milestones {late} are not before the last epoch ({self.epochs} epochs, "
                 "0-based): the decay would never happen; give milestones below --epochs")
        need(is_num(self.lr_gamma) and 0 < self.lr_gamma <= 1,
             f"lr_gamma must be in (0, 1], got {self.lr_gamma!r}")
        check_seed(self.seed)  # numpy and scikit-learn take 32 bits
        need(is_num(self.htr_gamma) and self.htr_gamma >= 0,
             f"htr_gamma must be >= 0 (0 switches HTR off), got {self.htr_gamma!r}")
        layers_ok = (isinstance(self.htr_layers, str) and bool(self.htr_layers.strip())) or (
            isinstance(self.htr_layers, (list, tuple))
            and len(self.htr_layers) > 0
            and all(isinstance(s, str) for s in self.htr_layers)
        )
        need(layers_ok, "htr_layers must be 'all', 'middle' or a non-empty list of layer names")
        if isinstance(self.htr_layers, tuple):
            self.htr_layers = list(self.htr_layers)
        need(is_int(self.htr_every) and self.htr_every >= 1,
             f"htr_every must be a positive integer, got {self.htr_every!r}")
        need(is_int(self.htr_start) and self.htr_start >= 0,
             f"htr_start must be a non-negative epoch index, got {self.htr_start!r}")
        need(is_int(self.htr_probes) and self.htr_probes >= 1,
             f"htr_probes must be a positive integer, got {self.htr_probes!r}")
        need(self.htr_method in ("hvp", "fd"),
             f"unknown htr_method {self.htr_method!r}; use 'hvp' or 'fd'")
        need(self.htr_distribution in ("rademacher", "gaussian"),
             f"unknown htr_distribution {self.htr_distribution!r}; use 'rademacher' or "
             "'gaussian'")
        need(self.htr_fd_eps is None or (is_num(self.htr_fd_eps) and self.htr_fd_eps > 0),
             f"htr_fd_eps must be a positive number or None, got {self.htr_fd_eps!r}")
        need(self.htr_curvature in CURVATURES,
             f"unknown htr_curvature {self.htr_curvature!r}; use one of {list(CURVATURES)}")
        need(self.htr_curvature == "hessian" or self.htr_method == "hvp",
             f"htr_method='fd' is for the Hessian only; htr_curvature={self.htr_curvature!r} "
             "needs htr_method='hvp'")
        need(is_num(self.sam_rho) and self.sam_rho >= 0,
             f"sam_rho must be >= 0 (0 switches SAM off), got {self.sam_rho!r}")
        need(is_int(self.track_every) and self.track_every >= 0,
             f"track_every must be a non-negative integer, got {self.track_every!r}")
        need(isinstance(self.track_layers, bool),
             f"track_layers must be True or False, got {self.track_layers!r}")
        need(is_int(self.track_per_class) and self.track_per_class >= 1,
             f"track_per_class must be a positive integer, got {self.track_per_class!r}")
        need(is_num(self.val_fraction) and 0 <= self.val_fraction < 1,
             f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        need(_is_device(self.device),
             f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}")
        need(isinstance(self.extra, dict), "extra must be a dict")
        return self

    def milestones_or_default(self) -> list[int]:
        """The multistep milestones (epochs), defaulting to half and three quarters."""
        if self.milestones is not None:
            return list(self.milestones)
        ms = {round(self.epochs / 2), round(3 * self.epochs / 4)}
        return sorted(m for m in ms if 1 <= m < self.epochs) or []

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict (as saved); unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise HesslensInputError(
                f"unknown training-config field(s) {unknown}; known fields: {sorted(names)}"
            )
        return cls(**d)


def arm_key(config: TrainConfig | dict[str, Any]) -> str:
    """A canonical string of everything but the run-only fields: runs with equal keys are seeds
    of one arm."""
    import json

    d = config.to_dict() if isinstance(config, TrainConfig) else dict(config)
    for k in RUN_ONLY_FIELDS:
        d.pop(k, None)
    # runs saved before htr_curvature existed penalised the Hessian: the same arm
    if d.get("htr_curvature", "hessian") == "hessian":
        d.pop("htr_curvature", None)
    return json.dumps(d, sort_keys=True, default=str)


def arm_label(config: TrainConfig | dict[str, Any]) -> str:
    """A short human name of the method of an arm: ``SGD``, ``SGD+L2(5e-04)``, ``SAM(0.05)``,
    ``SGD+HTR(1e-03, middle, hvp, every 50)``; the parts are joined with ``+``. A penalty on
    another curvature names it in place of the method: ``SGD+HTR(1e-03, all, gauss_newton,
    every 1)``."""
    d = config.to_dict() if isinstance(config, TrainConfig) else dict(config)
    parts = []
    if d.get("sam_rho", 0):
        parts.append(f"SAM({d['sam_rho']:g})")
    else:
        parts.append("SGD")
    if d.get("weight_decay", 0):
        parts.append(f"L2({d['weight_decay']:.0e})")
    if d.get("htr_gamma", 0):
        layers = d.get("htr_layers", "all")
        if isinstance(layers, (list, tuple)):
            layers = ",".join(layers)
        curvature = d.get("htr_curvature", "hessian")
        how = d.get("htr_method", "hvp") if curvature == "hessian" else curvature
        parts.append(
            f"HTR({d['htr_gamma']:.0e}, {layers}, {how}, "
            f"every {d.get('htr_every', 1)}"
            + (f", from epoch {d['htr_start']}" if d.get("htr_start", 0) else "")
            + ")"
        )
    return "+".join(parts)


def _is_device(name: Any) -> bool:
    """Whether ``name`` is a device string torch parses, of a kind training supports."""
    if not isinstance(name, str):
        return False
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return dev.type in ("cpu", "cuda", "mps")
