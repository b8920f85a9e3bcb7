"""What ``hesslens reproduce`` runs: the arms, seeds, budgets and tuning grids.

Every arm trains the same model on the same data for the same epochs with the same batch size,
learning rate, momentum and schedule; arms differ only in their own knob (weight decay, SAM's
rho, the Hessian-trace weight gamma), which is tuned on a validation split carved from the
training set (never on the test set), on tuning seeds that the final runs do not use, by the
mean validation accuracy over those seeds.

The default recipe (:func:`full_plan`) is the MNIST-1D paper's CNN (``cnn1d3``: three
convolutions of 25 channels, Greydanus 2020) trained with SGD and momentum; its SGD arm reaches
the published accuracy (about 94 %) in a few seconds of one CPU core per run.

Example:
    >>> plan = full_plan()
    >>> [arm.name for arm in plan.arms][:5]
    ['SGD', 'SGD+L2', 'SAM', 'HTR all layers', 'HTR middle layers']
    >>> [arm.name for arm in plan.arms][5:]
    ['HTR GN middle layers', 'HTR Fisher middle layers']
    >>> plan.tuning_seeds(), quick_plan().epochs < plan.epochs
    ((100, 101), True)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = ["RUN_ONLY", "Arm", "EdgeOfStability", "Plan", "full_plan", "quick_plan", "slug"]

#: Plan fields that say how the study was run, not what it is: a study resumed with other
#: values of these is the same study.
RUN_ONLY = ("workers", "world_size", "data_root")


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
class EdgeOfStability:
    """The edge-of-stability setting beyond the paper (Cohen et al. 2021, 2022): full-batch
    training of a tanh MLP on an MNIST-1D subset with the square loss, the sharpness recorded
    every ``every`` steps by :class:`hesslens.SharpnessMonitor`.

    Attributes:
        per_class: training examples per class in the subset (the whole batch).
        width: the MLP's two hidden widths.
        gd: ``(learning rate, steps)`` of each gradient-descent run.
        adam: ``(learning rate, steps)`` of each full-batch Adam run.
        every: steps between records.
        band: the verdicts' band around the threshold, as a ratio (sharpness / threshold).
        seed: the initial weights' seed.
    """

    per_class: int = 20
    width: int = 64
    gd: tuple[tuple[float, int], ...] = ((0.1, 2000), (0.2, 1000), (0.4, 600))
    adam: tuple[tuple[float, int], ...] = ((5e-3, 600),)
    every: int = 5
    band: tuple[float, float] = (0.9, 1.25)
    seed: int = 0


@dataclass(frozen=True)
class Plan:
    """The whole study: shared training recipe, arms, seeds, tracking and layer-study sizes.

    ``tune_seed`` is the first of ``n_tune_seeds`` consecutive tuning seeds
    (:meth:`tuning_seeds`). Tuning runs hold out ``val_fraction`` of the training set; the final
    runs hold out ``final_val_fraction`` (0: they train on all of it, as the published
    baselines do). ``workers``, ``world_size`` and ``data_root`` say how and where the study
    ran (:data:`RUN_ONLY`).
    """

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
    n_tune_seeds: int = 1
    momentum: float = 0.9
    schedule: str = "multistep"
    milestones: tuple[int, ...] | None = None
    lr_gamma: float = 0.25
    val_fraction: float = 0.1
    final_val_fraction: float = 0.1
    world_size: int = 1
    data_root: str | None = None
    edge_of_stability: EdgeOfStability | None = None

    def tuning_seeds(self) -> tuple[int, ...]:
        """The seeds every tuning run is repeated with."""
        return tuple(self.tune_seed + i for i in range(self.n_tune_seeds))

    def base_config(self) -> dict[str, Any]:
        """The TrainConfig fields every arm shares (the tuning runs' validation split)."""
        return {"model": self.model, "data": self.data, "data_root": self.data_root,
                "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                "momentum": self.momentum, "schedule": self.schedule,
                "milestones": None if self.milestones is None else list(self.milestones),
                "lr_gamma": self.lr_gamma, "val_fraction": self.val_fraction}

    def recipe(self) -> str:
        """The shared recipe in words, for the report."""
        sched = {"none": "constant learning rate",
                 "cosine": "cosine decay to 0",
                 "multistep": (f"learning rate x {self.lr_gamma:g} from epochs "
                               f"{list(self.milestones) if self.milestones else 'epochs/2, 3/4'}"
                               " (0-based)")}[self.schedule]
        return (f"{self.model} on {self.data}: SGD, momentum {self.momentum:g}, lr {self.lr:g}, "
                f"batch {self.batch_size}, {self.epochs} epochs, {sched}")

    def with_pair(self, model: str | None = None, data: str | None = None) -> Plan:
        """This plan on another zoo model / data set (same recipe and arms)."""
        return replace(self, model=model or self.model, data=data or self.data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _arms(htr_every: int) -> tuple[Arm, ...]:
    """The arms. The Gauss-Newton and Fisher penalties go on the middle layers, the layers
    whose trace the paper regularises, so that the three HTR middle arms differ only in the
    matrix whose trace is penalised."""
    htr = {"htr_every": htr_every, "htr_probes": 1, "htr_method": "hvp"}
    gammas = (3e-4, 1e-3, 3e-3)
    return (
        Arm("SGD"),
        Arm("SGD+L2", knob="weight_decay", grid=(1e-4, 5e-4, 2e-3), default=5e-4),
        Arm("SAM", knob="sam_rho", grid=(0.02, 0.05, 0.1), default=0.05),
        Arm("HTR all layers", fixed={**htr, "htr_layers": "all"}, knob="htr_gamma",
            grid=gammas, default=1e-3),
        Arm("HTR middle layers", fixed={**htr, "htr_layers": "middle"}, knob="htr_gamma",
            grid=gammas, default=1e-3),
        Arm("HTR GN middle layers",
            fixed={**htr, "htr_layers": "middle", "htr_curvature": "gauss_newton"},
            knob="htr_gamma", grid=gammas, default=1e-3),
        Arm("HTR Fisher middle layers",
            fixed={**htr, "htr_layers": "middle", "htr_curvature": "fisher"},
            knob="htr_gamma", grid=gammas, default=1e-3),
    )


def full_plan() -> Plan:
    """The default study: the MNIST-1D paper's CNN, 7 arms x 3 seeds, each knob tuned on
    validation over 2 tuning seeds (3 values each), and the edge-of-stability setting; a few
    minutes on 2 CPU cores."""
    return Plan(name="full", model="cnn1d3", data="mnist1d", epochs=30, batch_size=100, lr=0.1,
                seeds=(0, 1, 2), arms=_arms(htr_every=4), tune=True, tune_seed=100,
                n_tune_seeds=2, track_every=15, study_k=5, study_density_probes=2,
                study_density_steps=60, milestones=(20, 25), final_val_fraction=0.0,
                edge_of_stability=EdgeOfStability())


def quick_plan() -> Plan:
    """A smoke-sized study (under 2 minutes): 2 seeds, 5 epochs, default knobs, no tuning."""
    return Plan(name="quick", model="cnn1d3", data="mnist1d", epochs=5, batch_size=100, lr=0.1,
                seeds=(0, 1), arms=_arms(htr_every=4), tune=False, tune_seed=100,
                track_every=5, study_k=3, study_density_probes=1, study_density_steps=40,
                final_val_fraction=0.0,
                edge_of_stability=EdgeOfStability(gd=((0.4, 300),), adam=((1e-2, 200),)))
