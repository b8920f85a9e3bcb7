"""``hesslens train``: train one model of the zoo on one data set, with any of the arms; and
:func:`train_zoo`, the same from Python (the zoo's model and data built from the config's names,
then :func:`hesslens.training.train`, which takes objects only).

Examples (shell)::

    hesslens train --model cnn1d --data mnist1d --epochs 30 --out runs/sgd --seed 0
    hesslens train --model cnn1d --data mnist1d --wd 5e-4 --out runs/l2 --seed 0
    hesslens train --model cnn1d --data mnist1d --htr 1e-3 --htr-layers middle \\
        --htr-every 50 --out runs/htr --seed 0 --track-every 5
    hesslens train --model cnn1d --data mnist1d --sam 0.05 --out runs/sam --seed 0
    hesslens train ... --out runs/htr --resume      # continue a killed run
    torchrun --nproc-per-node 2 -m hesslens train ...  # data-parallel (DDP), any arm

Under ``torchrun`` every process runs the command: each takes its piece of every global batch
(the same batches as one process), gradients are summed over the processes, and rank 0 alone
writes the files and prints (see :mod:`hesslens.parallel`); ``metrics.json``
records ``"parallel": {"world_size", "backend"}``.

The command writes ``config.json``, ``metrics.json``, ``metrics.csv`` and ``checkpoint.pt`` into
``--out`` (see :mod:`hesslens.training.trainer`). After every epoch (``--track-every N``: every
N-th; 0: never) it records on the analysis subset the sharpness against the optimizer's
stability threshold, warm-started, a few products an epoch
(:mod:`hesslens.analysis.epoch_sharpness`); ``--track-layers`` tracks the full and per-layer
top eigenvalue and trace instead, from initialisation on
(:mod:`hesslens.analysis.epoch_tracking`). The trainer runs them as callbacks; this module wires
them from the configuration (:func:`tracking_callbacks`). The summary line and ``metrics.json``
(``tracking``) give what the tracking cost.
Bad input raises :class:`~hesslens.errors.HesslensInputError`, which the command line turns
into one line on stderr and exit code 2.

Example:
    >>> import tempfile
    >>> from hesslens.training import TrainConfig
    >>> cfg = TrainConfig(model="mlp", data="digits", epochs=1, batch_size=64, lr=0.05)
    >>> result = train_zoo(cfg, tempfile.mkdtemp(), progress=False)
    >>> result["final"]["epoch"], result["arm"]
    (1, 'SGD')
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from hesslens import zoo
from hesslens.analysis.epoch_sharpness import EpochSharpness
from hesslens.analysis.epoch_tracking import EpochTracking
from hesslens.errors import HesslensInputError
from hesslens.experiments.common import (
    SMALL_MODEL,
    apply_threads,
    check_out_dir,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    seed_int,
)
from hesslens.experiments.preflight import check_ready, refuse_hf_model
from hesslens.parallel import process_group_from_env, quiet_other_ranks
from hesslens.training.callbacks import Callback
from hesslens.training.config import TrainConfig
from hesslens.training.layers_select import select_layers
from hesslens.training.trainer import train

__all__ = ["add_train_arguments", "config_from_args", "preflight_train", "run_train",
           "summary_line", "tracking_callbacks", "train_zoo", "zoo_model_and_data"]


def zoo_model_and_data(config: TrainConfig) -> tuple[nn.Module, Any]:
    """The zoo data set named ``config.data`` (from ``config.data_root``) and the zoo model
    ``config.model`` built for it with weights from ``config.seed``: the same objects every
    time, so that a resumed run rebuilds the model its checkpoint was written from.

    >>> model, data = zoo_model_and_data(TrainConfig(model="mlp", data="digits"))
    >>> data.name, data.num_classes, type(model).__name__
    ('digits', 10, 'MLP')
    """
    if not isinstance(config, TrainConfig):
        raise HesslensInputError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    data = zoo.load_dataset(config.data, root=config.data_root, seed=config.seed)
    model = zoo.build_model(config.model, data.input_shape, data.num_classes, seed=config.seed)
    return model, data


def train_zoo(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    similarity: Callable[[Any, Any], Any] | None = None,
) -> dict[str, Any]:
    """Train the zoo model ``config.model`` on the zoo data set ``config.data``: the objects of
    :func:`zoo_model_and_data` given to :func:`hesslens.training.train`, with the curvature
    tracking ``config.track_*`` asks for (:func:`tracking_callbacks`, run before
    ``callbacks``; see :func:`~hesslens.training.train` for the files, the arguments and the
    result). ``similarity``: the spectrum similarity of per-layer tracking with densities.
    With ``resume=True`` the model is rebuilt from the config and the trainer restores the
    checkpoint into it, under ``torchrun`` too.
    """
    model, data = zoo_model_and_data(config)
    return train(config, out_dir, model=model, dataset=data, progress=progress, resume=resume,
                 callbacks=[*tracking_callbacks(config, similarity), *callbacks])


def tracking_callbacks(config: TrainConfig,
                       similarity: Callable[[Any, Any], Any] | None = None) -> list[Callback]:
    """The trainer callbacks that do the curvature tracking ``config`` asks for: none at
    ``track_every=0``; with ``track_layers``, :class:`~hesslens.analysis.epoch_tracking.
    EpochTracking` (full and per-layer trace and top eigenvalue, from initialisation on; with
    ``similarity`` where densities are tracked); else the cheap
    :class:`~hesslens.analysis.epoch_sharpness.EpochSharpness` (the sharpness against the
    optimizer's threshold). Both read the schedule and the analysis subset from the run.

    >>> [type(cb).__name__ for cb in tracking_callbacks(TrainConfig(track_every=2))]
    ['EpochTracking']
    >>> tracking_callbacks(TrainConfig(track_every=0))
    []
    """
    if config.track_every <= 0:
        return []
    if config.track_layers:
        return [EpochTracking(similarity=similarity)]
    return [EpochSharpness()]


def _milestones(s: str) -> list[int]:
    try:
        out = [int(t) for t in s.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated epoch numbers such as 15,22, got {s!r}"
        ) from None
    if not out or any(m < 1 for m in out):
        raise argparse.ArgumentTypeError(f"expected positive epoch numbers, got {s!r}")
    return out


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``hesslens train`` options to ``parser``."""
    d = TrainConfig()
    parser.epilog = (
        "Data-parallel: python -m torch.distributed.run --nproc-per-node N -m hesslens train "
        "... (each process its piece of every batch, the same steps as one process; rank 0 "
        "writes --out, which every process must see)")
    g = parser.add_argument_group("what to train")
    g.add_argument("--model", default=d.model,
                   help="zoo model: mlp, mlp5, cnn1d, lenet, vgg11, vgg11_bn, resnet18, resnet20 "
                        f"(default {d.model})")
    g.add_argument("--data", default=d.data,
                   help="zoo data set: mnist1d, digits (built in), mnist, fashionmnist, svhn, "
                        f"cifar10, cifar100 (local files, see --data-root) (default {d.data})")
    g.add_argument("--data-root", default=None, metavar="DIR",
                   help="folder holding the local files of the file-based data sets")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction, metavar="F",
                   help=f"share of the training set held out for validation (default "
                        f"{d.val_fraction})")

    g = parser.add_argument_group("optimisation (SGD with momentum)")
    g.add_argument("--epochs", type=positive_int, default=d.epochs,
                   help=f"(default {d.epochs})")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help=f"(default {d.batch_size})")
    g.add_argument("--lr", type=positive_float, default=d.lr,
                   help=f"learning rate (default {d.lr})")
    g.add_argument("--momentum", type=nonnegative_float, default=d.momentum,
                   help=f"(default {d.momentum})")
    g.add_argument("--wd", "--weight-decay", dest="weight_decay", type=nonnegative_float,
                   default=d.weight_decay, help="weight decay: the L2 arm (default 0)")
    g.add_argument("--schedule", choices=["none", "multistep", "cosine"], default=d.schedule,
                   help="learning-rate schedule; multistep multiplies by --lr-gamma at the "
                        "milestones (default: half and three quarters of --epochs)")
    g.add_argument("--milestones", type=_milestones, default=None, metavar="E1,E2",
                   help="0-based epoch indices from which each multistep decay applies "
                        "(PyTorch MultiStepLR convention)")
    g.add_argument("--lr-gamma", type=positive_float, default=d.lr_gamma,
                   help=f"multistep decay factor (default {d.lr_gamma}, as the paper)")

    g = parser.add_argument_group("Hessian-trace regularization (HTR)")
    g.add_argument("--htr", dest="htr_gamma", type=nonnegative_float, default=0.0,
                   metavar="GAMMA", help="add GAMMA * tr(H) to the loss (default 0: off)")
    g.add_argument("--htr-layers", default="all", metavar="all|middle|NAME,NAME",
                   help="layers whose Hessian blocks are penalised (default all)")
    g.add_argument("--htr-every", type=positive_int, default=d.htr_every, metavar="K",
                   help="apply the penalty every K-th step (the paper: 50; default 1)")
    g.add_argument("--htr-start", type=nonnegative_int, default=d.htr_start, metavar="EPOCH",
                   help="first epoch (0-based) with the penalty (default 0)")
    g.add_argument("--htr-probes", type=positive_int, default=d.htr_probes, metavar="P",
                   help="Hutchinson probes per evaluation (default 1)")
    g.add_argument("--htr-curvature", choices=["hessian", "gauss_newton", "fisher"],
                   default=d.htr_curvature,
                   help="the matrix whose trace is penalised: hessian (the paper; indefinite), "
                        "gauss_newton (positive semi-definite part) or fisher (the empirical "
                        "Fisher: mean squared per-sample gradient norm, exact, no probes); "
                        "gauss_newton and fisher need --htr-method hvp (default hessian)")
    g.add_argument("--htr-method", choices=["hvp", "fd"], default=d.htr_method,
                   help="hvp: double backward (exact quadratic forms); fd: finite differences "
                        "of the loss, first-order only, cheaper (default hvp)")
    g.add_argument("--htr-distribution", choices=["rademacher", "gaussian"],
                   default=d.htr_distribution, help="probe distribution (default rademacher)")
    g.add_argument("--htr-fd-eps", type=positive_float, default=None, metavar="REL",
                   help="relative finite-difference step (default: (48 u)^(1/4), u the unit "
                        "round-off)")

    g = parser.add_argument_group("SAM and curvature tracking")
    g.add_argument("--sam", dest="sam_rho", type=nonnegative_float, default=0.0, metavar="RHO",
                   help="sharpness-aware minimisation with radius RHO (default 0: off)")
    g.add_argument("--track-every", type=nonnegative_int, default=1, metavar="N",
                   help="record curvature on the analysis subset every N epochs and after "
                        "the last (default 1: every epoch; 0: off): the sharpness against "
                        "the optimizer's stability threshold (2 + 2 momentum)/lr, a few "
                        "products an epoch; with --track-layers the trace and top eigenvalue, "
                        "full and per layer, from initialisation on")
    g.add_argument("--track-layers", action="store_true",
                   help="track the full and per-layer trace and top eigenvalue (heavier: many "
                        "products a layer) instead of the sharpness")
    g.add_argument("--track-per-class", type=positive_int, default=d.track_per_class,
                   metavar="K", help="analysis subset: K training examples per class "
                                     "(default 10)")
    g.add_argument("--track-densities", action="store_true",
                   help="also record eigenvalue densities (slower)")

    g = parser.add_argument_group("run")
    g.add_argument("--out", required=True, metavar="DIR", help="output folder of the run")
    g.add_argument("--seed", type=seed_int, default=0, help="(default 0; below 2**32)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    g.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads for torch (default: 1 for models under "
                        f"{SMALL_MODEL // 10**6}M parameters, else torch's choice)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (same settings; "
                        "a finished run cannot be extended with more --epochs)")
    g.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                   help="no progress bars")


def config_from_args(args: argparse.Namespace):
    """The :class:`~hesslens.training.config.TrainConfig` the parsed arguments describe."""
    layers: str | list[str] = args.htr_layers.strip()
    if layers not in ("all", "middle"):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
        if not layers:
            raise HesslensInputError(
                "--htr-layers is empty: give all, middle or comma-separated layer names"
            )
    return TrainConfig(
        model=args.model,
        data=args.data,
        data_root=args.data_root,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        milestones=args.milestones,
        lr_gamma=args.lr_gamma,
        seed=args.seed,
        htr_gamma=args.htr_gamma,
        htr_layers=layers,
        htr_every=args.htr_every,
        htr_start=args.htr_start,
        htr_probes=args.htr_probes,
        htr_method=args.htr_method,
        htr_distribution=args.htr_distribution,
        htr_fd_eps=args.htr_fd_eps,
        htr_curvature=getattr(args, "htr_curvature", "hessian"),
        sam_rho=args.sam_rho,
        track_every=args.track_every,
        track_layers=bool(getattr(args, "track_layers", False)),
        track_per_class=args.track_per_class,
        track_densities=args.track_densities,
        val_fraction=args.val_fraction,
        device=args.device,
    ).validate()


def preflight_train(args: argparse.Namespace) -> tuple[TrainConfig, nn.Module, Any]:
    """Everything ``hesslens train`` can know before any work: the flags (the config's own
    checks), a model the trainer can train (a classifier, not a Hugging Face model), the
    device, the output folder (writable, not a file), then the model/data pair and the HTR
    layer names. Returns the config and the model and data the run trains. It needs no
    module beyond the core ones."""
    config = config_from_args(args)
    refuse_hf_model(config.model, "hesslens train")
    check_ready(out=args.out, device=config.device)
    model, data = zoo_model_and_data(config)
    if config.htr_gamma > 0:
        select_layers(model, config.htr_layers)  # an unknown name fails before --out exists
    return config, model, data


def run_train(args: argparse.Namespace) -> int:
    """Run ``hesslens train``; print a one-line summary; return the exit code (0)."""
    config, model, data = preflight_train(args)
    # Small models train several times faster on one thread than on contended cores.
    apply_threads(getattr(args, "threads", None), sum(p.numel() for p in model.parameters()))
    with process_group_from_env(config.device) as ranks:  # under torchrun: data-parallel
        quiet_other_ranks(ranks)
        check_out_dir(args.out)  # the trainer locks --out for the run (and creates it)
        result = train(config, args.out, model=model, dataset=data,
                       progress=not getattr(args, "no_progress", False),
                       resume=bool(getattr(args, "resume", False)),
                       callbacks=tracking_callbacks(config))
    if ranks.is_main:
        print(summary_line(result, config, args.out))
    return 0


def summary_line(result: dict, config, out: str) -> str:
    """The one line ``hesslens train`` prints at the end (rank 0 only under torchrun)."""
    final = result["final"]
    if not final:
        return f"{result['arm']}: nothing to do; results in {out}"
    parts = [f"{result['arm']} on {config.model}/{config.data}, seed {config.seed}: "
             f"epoch {final['epoch']}",
             f"test acc {final['test_acc']:.4f}"]
    if final.get("val_acc") is not None:
        parts.append(f"val acc {final['val_acc']:.4f}")
    if final.get("trace") is not None:
        parts.append(f"trace {final['trace']:.4g}")
    if final.get("top_eigenvalue") is not None:
        parts.append(f"top eigenvalue {final['top_eigenvalue']:.4g}")
    if final.get("sharpness") is not None:
        threshold = final.get("threshold")
        parts.append(f"sharpness {final['sharpness']:.4g}"
                     + (f" (threshold {threshold:.4g})" if threshold is not None else ""))
    secs = [r["epoch_seconds"] for r in result["epochs"] if r.get("epoch_seconds") is not None]
    if secs:
        parts.append(f"{sum(secs) / len(secs):.2f} s/epoch")
    cost = result.get("tracking")
    if cost:
        share = (f"{cost['fraction']:.1f}x" if cost["fraction"] >= 1
                 else f"{cost['fraction']:.0%} of")
        parts.append(f"curvature tracking {cost['seconds']:.2f} s ({share} the training time)")
    world = result.get("parallel", {}).get("world_size", 1)
    if world > 1:
        parts.append(f"{world} processes")
    return ", ".join(parts) + f"; results in {out}"
