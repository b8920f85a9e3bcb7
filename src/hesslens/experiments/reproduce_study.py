"""The study stage of ``hesslens reproduce``: the layer study of the final models.

Example:
    >>> STUDY_ARMS
    ('SGD', 'HTR all layers')
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hesslens.experiments.reproduce_plan import Plan, slug

__all__ = ["STUDY_ARMS", "run_study"]

STUDY_ARMS = ("SGD", "HTR all layers")


def run_study(plan: Plan, out: Path, runs: dict[str, list[Path]], device: str,
           progress: bool, dtype: Any = None) -> dict[str, Any]:
    """Layer study of the first seed's final model of each arm in STUDY_ARMS."""
    import torch

    from hesslens.analysis import layer_study
    from hesslens.experiments.common import load_state_dict
    from hesslens.provenance import data_fingerprint, dataset_fingerprint, versions
    from hesslens.report.layer_report import write_layer_study
    from hesslens.zoo import analysis_subset, build_model, load_dataset

    data = load_dataset(plan.data)
    x, y = analysis_subset(data.x_train, data.y_train, per_class=10, seed=0)
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
