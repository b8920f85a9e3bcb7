"""The study stage of ``hesslens reproduce``: the layer study of the final models, and the
measurements that let the findings fail.

* the layer study (:func:`hesslens.analysis.layer_study`) of the first seed's final model of
  each arm in :data:`STUDY_ARMS` (``study/<arm>/``, each with its own ``report.html``);
* per-probe spectra (:func:`hesslens.analysis.probe_spectra.probe_spectra`) of the default
  model's final SGD networks (several seeds) and of the same networks at initialisation, the
  control of finding 1 (``study/probes/default.json``);
* a deeper network (the zoo's ``mlp5``: five hidden layers, so that "the middle" is three
  layers) trained with SGD over several seeds, its per-probe spectra at initialisation and
  after a few epoch counts (``study/mlp5/``): finding 2 with intervals over seeds and probes,
  along training;
* the transformer block study: ``gpt-nano`` on ``modadd`` at initialisation, blocks q, k, v, o,
  mlp_in, mlp_out per layer plus embeddings and norms (``study/gpt-nano/probes.json``).

Every part is skipped when its file exists (a resumed study does not measure twice). The
sizes of the parts are :data:`SIZES`, keyed on the plan's name.

Example:
    >>> STUDY_ARMS
    ('SGD', 'HTR all layers')
    >>> study_sizes("quick").deep_seeds, study_sizes("full").deep_seeds
    ((0,), (0, 1, 2))
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hesslens import zoo
from hesslens.analysis import layer_study
from hesslens.analysis.probe_spectra import probe_spectra
from hesslens.curvature import Hessian
from hesslens.experiments.common import load_state_dict
from hesslens.experiments.reproduce_eos import run_edge_of_stability
from hesslens.experiments.reproduce_jobs import run_jobs
from hesslens.experiments.reproduce_plan import Plan, slug
from hesslens.files import write_json
from hesslens.provenance import data_fingerprint, dataset_fingerprint, versions
from hesslens.report.layer_report import write_layer_study
from hesslens.zoo import analysis_subset, build_model, load_dataset
from hesslens.zoo.tasks import IGNORE_INDEX

__all__ = ["EXTRA", "SIZES", "STUDY_ARMS", "StudySizes", "run_study", "study_sizes"]

STUDY_ARMS = ("SGD", "HTR all layers")
#: The key of :func:`run_study`'s result that holds the extra studies (not an arm).
EXTRA = "extra studies"


@dataclass(frozen=True)
class StudySizes:
    """How large the extra studies are.

    Attributes:
        seeds: trained seeds of the default model measured probe by probe (the first ones).
        control_seeds: of those, how many are also measured at initialisation.
        probes, steps: SLQ probes (one measure each) and Lanczos steps per probe.
        deep_model, deep_seeds, deep_epochs, deep_lr, deep_batch: the deeper network, its
            seeds, the epoch counts measured (0 = initialisation; each count a run of its own
            from the same initialisation, constant learning rate) and its SGD settings.
        transformer, transformer_data, transformer_per_class, transformer_probes,
        transformer_steps: the transformer block study (at initialisation);
        transformer_train_steps, transformer_lr: also after this many full-batch AdamW steps
            on the task's training set (0: initialisation only).
    """

    seeds: int
    control_seeds: int
    probes: int
    steps: int
    deep_model: str
    deep_seeds: tuple[int, ...]
    deep_epochs: tuple[int, ...]
    deep_lr: float
    deep_batch: int
    transformer: str
    transformer_data: str
    transformer_per_class: int
    transformer_probes: int
    transformer_steps: int
    transformer_train_steps: int = 0
    transformer_lr: float = 3e-3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SIZES = {
    "full": StudySizes(seeds=3, control_seeds=2, probes=3, steps=40, deep_model="mlp5",
                       deep_seeds=(0, 1, 2), deep_epochs=(0, 5, 40), deep_lr=0.1,
                       deep_batch=128, transformer="gpt-nano", transformer_data="modadd",
                       transformer_per_class=1, transformer_probes=3, transformer_steps=20,
                       transformer_train_steps=200),
    "quick": StudySizes(seeds=1, control_seeds=1, probes=2, steps=16, deep_model="mlp5",
                        deep_seeds=(0,), deep_epochs=(0, 2), deep_lr=0.1, deep_batch=128,
                        transformer="gpt-nano", transformer_data="modadd",
                        transformer_per_class=1, transformer_probes=2, transformer_steps=10),
}


def study_sizes(plan_name: str) -> StudySizes:
    """The sizes for a plan (a plan of another name gets the quick ones)."""
    return SIZES.get(plan_name, SIZES["quick"])


def _cpu() -> float:
    """CPU seconds of this process and of its finished worker processes."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def _timed(fn: Any) -> tuple[Any, dict[str, float]]:
    w0, c0 = time.perf_counter(), _cpu()
    out = fn()
    return out, {"wall": time.perf_counter() - w0, "cpu": _cpu() - c0}


def _read_or(path: Path, make: Any) -> dict[str, Any]:
    """The part saved at ``path``, or ``make()`` timed (``seconds``: wall and CPU) and
    saved there."""
    if path.is_file():
        return json.loads(path.read_text())
    result, seconds = _timed(make)
    result["seconds"] = seconds
    write_json(path, result)
    return result


def _probe_spectra(model: Any, loss_fn: Any, data: Any, sizes: StudySizes, k: int,
                   device: str, dtype: Any, layers: Any = None, steps: int | None = None,
                   probes: int | None = None) -> dict[str, Any]:
    H = Hessian(model, loss_fn, data, layers=layers, dtype=dtype, device=device,
                path="reverse")
    return probe_spectra(H, k=k, n_probes=probes or sizes.probes,
                         n_steps=steps or sizes.steps, tol=1e-6, seed=0).to_dict()


def _layer_studies(plan: Plan, out: Path, runs: dict[str, list[Path]], device: str,
                   progress: bool, dtype: Any, data: Any, x: Any, y: Any) -> dict[str, Any]:
    studies = {}
    for name in STUDY_ARMS:
        if name not in runs:
            continue
        study_dir = out / "study" / slug(name)
        results_file = study_dir / "results.json"
        if results_file.is_file():
            studies[name] = json.loads(results_file.read_text())
            continue
        run_dir = runs[name][0]
        model = build_model(plan.model, data.input_shape, data.num_classes, seed=plan.seeds[0])
        state, _ = load_state_dict(run_dir / "checkpoint.pt")
        model.load_state_dict(state)
        model.eval()
        study = layer_study(
            model, torch.nn.functional.cross_entropy, (x.to(device), y.to(device)),
            k=plan.study_k, density_probes=plan.study_density_probes,
            density_steps=plan.study_density_steps, seed=0, device=device, dtype=dtype,
            progress=progress)
        results = study.to_dict()
        results["settings"] = {**results.get("settings", {}), "model": plan.model,
                               "data": plan.data, "checkpoint": str(run_dir / "checkpoint.pt"),
                               "arm": name}
        results["data"] = {**dataset_fingerprint(data, plan.data),
                           "analysis_subset": data_fingerprint(
                               f"{plan.data} analysis subset", {"x": x, "y": y})}
        results["versions"] = versions(device)
        write_layer_study(results, study_dir)
        studies[name] = results
    return studies


def _default_probes(plan: Plan, runs: dict[str, list[Path]], sizes: StudySizes, device: str,
                    dtype: Any, data: Any, x: Any, y: Any) -> dict[str, Any]:
    """Per-probe spectra of the default model: final SGD networks and the same at
    initialisation (finding 1's control, finding 2's second setting)."""
    k = data.num_classes + 2  # the outliers (about C) deflated exactly, two to spare
    trained, init = {}, {}
    for i, run_dir in enumerate(runs.get("SGD", [])[:sizes.seeds]):
        seed = plan.seeds[i]
        for state_name, target in (("trained", trained), ("init", init)):
            if state_name == "init" and i >= sizes.control_seeds:
                continue
            model = build_model(plan.model, data.input_shape, data.num_classes, seed=seed)
            if state_name == "trained":
                state, _ = load_state_dict(Path(run_dir) / "checkpoint.pt")
                model.load_state_dict(state)
            model.eval()
            target[str(seed)] = _probe_spectra(model, torch.nn.functional.cross_entropy,
                                               (x.to(device), y.to(device)), sizes, k, device,
                                               dtype)
    return {"model": plan.model, "data": plan.data, "num_classes": data.num_classes,
            "num_samples": int(y.shape[0]), "k": k, "trained": trained, "init": init}


def _deep(plan: Plan, out: Path, sizes: StudySizes, device: str, progress: bool, dtype: Any,
          data: Any, x: Any, y: Any) -> dict[str, Any]:
    """The deeper network: SGD runs to each epoch count, per-probe spectra of each."""
    root = out / "study" / sizes.deep_model
    base = {"model": sizes.deep_model, "data": plan.data, "batch_size": sizes.deep_batch,
            "lr": sizes.deep_lr, "schedule": "none", "val_fraction": 0.1, "device": device,
            "track_every": 0}
    if getattr(plan, "data_root", None):
        base["data_root"] = str(plan.data_root)
    jobs = [({**base, "epochs": e, "seed": s}, root / f"seed{s}" / f"epochs{e}")
            for s in sizes.deep_seeds for e in sizes.deep_epochs if e > 0]
    if jobs:
        run_jobs(jobs, plan.workers, progress, f"train {sizes.deep_model} (finding 2)")
    k = 3
    spectra: dict[str, dict[str, Any]] = {}
    accuracy: dict[str, dict[str, float]] = {}
    for s in sizes.deep_seeds:
        for e in sizes.deep_epochs:
            model = build_model(sizes.deep_model, data.input_shape, data.num_classes, seed=s)
            if e > 0:
                run_dir = root / f"seed{s}" / f"epochs{e}"
                state, _ = load_state_dict(run_dir / "checkpoint.pt")
                model.load_state_dict(state)
                epochs = json.loads((run_dir / "metrics.json").read_text())["epochs"]
                accuracy.setdefault(str(e), {})[str(s)] = float(epochs[-1]["test_acc"])
            model.eval()
            spectra.setdefault(str(e), {})[str(s)] = _probe_spectra(
                model, torch.nn.functional.cross_entropy, (x.to(device), y.to(device)), sizes,
                k, device, dtype)
    return {"model": sizes.deep_model, "data": plan.data, "epochs": list(sizes.deep_epochs),
            "seeds": list(sizes.deep_seeds), "config": base, "k": k, "spectra": spectra,
            "test_acc": accuracy}


def _answer_accuracy(model: Any, x: Any, y: Any) -> float:
    """Share of sequences whose every predicted token is right (the logits at ``t - 1``
    predict the label at ``t``)."""
    with torch.no_grad():
        pred = model(input_ids=x).logits[:, :-1].argmax(-1)
    labels = y[:, 1:]
    ok = (pred == labels) | (labels == IGNORE_INDEX)
    return float(ok.all(dim=1).float().mean())


def _fit_transformer(model: Any, x: Any, y: Any, steps: int, lr: float, seed: int) -> None:
    """Full-batch AdamW on ``(x, y)`` with the model's own loss. The trainer of ``hesslens
    train`` takes the zoo's classifiers, not token tasks; this is the smallest loop that gives
    the block study a trained transformer."""
    torch.manual_seed(seed)
    (batch,) = zoo.model_batches("gpt-nano", x, y)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.eval()


def _transformer(plan: Plan, sizes: StudySizes, device: str, dtype: Any) -> dict[str, Any]:
    """The block study of the small GPT at initialisation (and trained, where asked)."""
    ds = zoo.load_dataset(sizes.transformer_data)
    info = zoo.dataset_info(sizes.transformer_data)
    model = zoo.build_model(sizes.transformer, info.input_shape, info.num_classes,
                            seed=plan.seeds[0]).eval()
    x, y = zoo.token_subset(*ds.train, per_class=sizes.transformer_per_class, seed=0)
    batches = zoo.model_batches(sizes.transformer, x.to(device), y.to(device))

    def measure() -> dict[str, Any]:
        return _probe_spectra(model, zoo.model_loss(sizes.transformer), batches, sizes, 3,
                              device, dtype, layers="transformer",
                              steps=sizes.transformer_steps, probes=sizes.transformer_probes)

    out = {"model": sizes.transformer, "data": sizes.transformer_data,
           "state": "initialisation", "num_sequences": int(x.shape[0]),
           "n_params": sum(p.numel() for p in model.parameters()), "probes": measure()}
    if sizes.transformer_train_steps > 0:
        _fit_transformer(model, *ds.train, sizes.transformer_train_steps, sizes.transformer_lr,
                         plan.seeds[0])
        out["trained"] = {"steps": sizes.transformer_train_steps, "lr": sizes.transformer_lr,
                          "optimizer": "AdamW (weight decay 0.1), full batch",
                          "train_acc": _answer_accuracy(model, *ds.train),
                          "test_acc": _answer_accuracy(model, *ds.test), "probes": measure()}
    return out


def run_study(plan: Plan, out: Path, runs: dict[str, list[Path]], device: str,
              progress: bool, dtype: Any = None) -> dict[str, Any]:
    """Layer studies of the final models of :data:`STUDY_ARMS` (``{arm: results}``) and,
    under :data:`EXTRA`, the per-probe studies of the default model, the deeper network and
    the transformer, and the plan's edge-of-stability setting, each with ``seconds`` (wall and
    CPU, when it was measured)."""
    data = load_dataset(plan.data, root=getattr(plan, "data_root", None))
    x, y = analysis_subset(data.x_train, data.y_train, per_class=10, seed=0)
    sizes = study_sizes(plan.name)
    studies, seconds = _timed(lambda: _layer_studies(
        plan, out, runs, device, progress, dtype, data, x, y))
    root = out / "study"
    extra: dict[str, Any] = {"sizes": sizes.to_dict(), "layer_study_seconds": seconds}
    extra["default"] = _read_or(root / "probes" / "default.json", lambda: _default_probes(
        plan, runs, sizes, device, dtype, data, x, y))
    extra["deep"] = _read_or(root / sizes.deep_model / "probes.json", lambda: _deep(
        plan, out, sizes, device, progress, dtype, data, x, y))
    extra["transformer"] = _read_or(root / sizes.transformer / "probes.json",
                                    lambda: _transformer(plan, sizes, device, dtype))
    eos = getattr(plan, "edge_of_stability", None)
    if eos is not None:  # beyond the paper: sharpness at the edge of stability
        extra["edge_of_stability"] = _read_or(root / "edge_of_stability" / "sharpness.json",
                                              lambda: run_edge_of_stability(eos, device))
    studies[EXTRA] = extra
    return studies
