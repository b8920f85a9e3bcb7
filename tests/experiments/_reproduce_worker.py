"""One rank of ``reproduce`` on a tiny plan under torchrun (test_reproduce_torchrun.py).

Usage: ``torchrun --nproc-per-node 2 _reproduce_worker.py OUT [EPOCHS]``; each rank writes its
exit code to ``OUT/rc-<rank>`` and rank 0 prints the summary.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hesslens.errors import HesslensError
from hesslens.experiments.reproduce import reproduce
from hesslens.experiments.reproduce_plan import Arm, Plan
from hesslens.parallel import process_group_from_env


def tiny_plan(epochs: int = 1) -> Plan:
    arms = (Arm("SGD"), Arm("SGD+L2", knob="weight_decay", grid=(1e-4, 1e-2), default=1e-4))
    return Plan(name="tiny", model="mlp", data="mnist1d", epochs=epochs, batch_size=500,
                lr=0.1, seeds=(0, 1), arms=arms, tune=True, tune_seed=100, n_tune_seeds=2,
                track_every=0, study_k=2, study_density_probes=1, study_density_steps=12,
                workers=1, final_val_fraction=0.0)


def main(out: str, epochs: int) -> int:
    import torch

    torch.set_num_threads(1)
    with process_group_from_env("cpu") as ranks:
        rank = ranks.rank
        try:
            result = reproduce(tiny_plan(epochs), out, progress=False)
            code = 0
        except HesslensError as err:
            print(f"rank {rank}: error: {err}", file=sys.stderr)
            code = 2
        if code == 0 and ranks.is_main:
            print(result["summary_text"])
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rc-{rank}").write_text(str(code))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1))
