"""The training jobs of ``hesslens reproduce``: one run each, skipped when finished, on a pool
of spawned worker processes (one torch thread each).

Example:
    >>> from pathlib import Path
    >>> finished(Path("/nonexistent"), epochs=3)
    False
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

__all__ = ["finished", "run_jobs"]


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _train_job(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Train one run to the end (continuing it if it was interrupted)."""
    from hesslens.training import TrainConfig, train

    result = train(TrainConfig.from_dict(config), run_dir, progress=False, resume=True)
    return {"run_dir": run_dir, "final": result["final"]}


def finished(run_dir: Path, epochs: int) -> bool:
    try:
        data = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    # count trained epochs: a tracked run also has an epoch-0 record (initialisation)
    return sum(1 for e in data.get("epochs", []) if e.get("epoch", 1) >= 1) >= epochs


def run_jobs(jobs: list[tuple[dict[str, Any], Path]], workers: int, progress: bool,
              desc: str) -> None:
    from tqdm.auto import tqdm

    todo = [(c, d) for c, d in jobs if not finished(d, c["epochs"])]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit="run",
               disable=not progress, file=sys.stderr)
    try:
        if workers <= 1 or len(todo) <= 1:
            _init_worker()
            for config, run_dir in todo:
                _train_job(config, str(run_dir))
                bar.update()
            return
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
            futures = [pool.submit(_train_job, c, str(d)) for c, d in todo]
            for future in as_completed(futures):
                future.result()
                bar.update()
    finally:
        bar.close()
