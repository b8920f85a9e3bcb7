"""What ``hesslens reproduce`` runs: the arms, seeds, budgets and tuning grids.

Every arm trains the same model on the same data for the same epochs with the same batch size,
learning rate and schedule; arms differ only in their own knob (weight decay, SAM's rho, the
Hessian-trace weight gamma), which is tuned on a validation split carved from the training set
(never on the test set) with a seed that the final runs do not use.

Example:
    >>> plan = full_plan()
    >>> [arm.name for arm in plan.arms]
    ['SGD', 'SGD+L2', 'SAM', 'HTR all layers', 'HTR middle layers']
    >>> quick_plan().epochs < plan.epochs
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def slug(name: str) -> str:
    """A folder name for an arm: ``"HTR all layers"`` -> ``"htr-all-layers"``."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


@dataclass(frozen=True)
class Arm:
    """One training method: a name, the TrainConfig fields it sets, and the knob it tunes."""

    name: str
    fixed: dict[str, Any] = field(default_factory=dict)
    knob: str | None = None
    grid: tuple[float, ...] = ()
    default: float | None = None

    def config_fields(self, value: float | None) -> dict[str, Any]:
        """The TrainConfig fields of this arm with its knob at ``value``."""
        fields = dict(self.fixed)
        if self.knob is not None:
            fields[self.knob] = self.default if value is None else value
        return fields


@dataclass(frozen=True)
class Plan:
    """The whole study: shared training budget, arms, seeds, tracking and layer-study sizes."""

    name: str
    model: str
    data: str
    epochs: int
    batch_size: int
    lr: float
    seeds: tuple[int, ...]
    arms: tuple[Arm, ...]
    tune: bool
    tune_seed: int
    track_every: int
    study_k: int
    study_density_probes: int
    study_density_steps: int
    workers: int = 2

    def base_config(self) -> dict[str, Any]:
        """The TrainConfig fields every arm shares."""
        return {"model": self.model, "data": self.data, "epochs": self.epochs,
                "batch_size": self.batch_size, "lr": self.lr, "schedule": "multistep",
                "val_fraction": 0.1}

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _arms(htr_every: int) -> tuple[Arm, ...]:
    htr = {"htr_every": htr_every, "htr_probes": 1, "htr_method": "hvp"}
    return (
        Arm("SGD"),
        Arm("SGD+L2", knob="weight_decay", grid=(1e-4, 5e-4, 2e-3), default=5e-4),
        Arm("SAM", knob="sam_rho", grid=(0.02, 0.05, 0.1), default=0.05),
        Arm("HTR all layers", fixed={**htr, "htr_layers": "all"}, knob="htr_gamma",
            grid=(3e-4, 1e-3, 3e-3, 1e-2), default=1e-3),
        Arm("HTR middle layers", fixed={**htr, "htr_layers": "middle"}, knob="htr_gamma",
            grid=(3e-4, 1e-3, 3e-3, 1e-2), default=1e-3),
    )


def full_plan() -> Plan:
    """The default study: 1-D CNN on MNIST-1D, 5 arms x 5 seeds, each knob tuned on
    validation; about 5 minutes on 2 CPU cores."""
    return Plan(name="full", model="cnn1d", data="mnist1d", epochs=24, batch_size=128, lr=0.2,
                seeds=(0, 1, 2, 3, 4), arms=_arms(htr_every=2), tune=True, tune_seed=100,
                track_every=4, study_k=5, study_density_probes=2, study_density_steps=60)


def quick_plan() -> Plan:
    """A smoke-sized study (under 2 minutes): 2 seeds, 5 epochs, default knobs, no tuning."""
    return Plan(name="quick", model="cnn1d", data="mnist1d", epochs=5, batch_size=128, lr=0.2,
                seeds=(0, 1), arms=_arms(htr_every=4), tune=False, tune_seed=100,
                track_every=2, study_k=3, study_density_probes=1, study_density_steps=40)
