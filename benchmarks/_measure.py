"""Helpers the memory benchmarks share: the process's memory counters and an atomic JSON write."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def vm(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` (bytes) of this process, from ``/proc/self/status``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


#: The environment of a measuring child process: glibc's malloc maps every block above 1 MiB
#: (``MALLOC_MMAP_THRESHOLD_``; by default the threshold grows with the blocks freed, up to
#: 32 MiB, and parameter-sized blocks below it stay in the heap, fragmented), so that a freed
#: tensor leaves the resident set at once and the peak counts tensors, as
#: ``torch.cuda.max_memory_allocated`` does on a GPU. Without it the same call's peak varies by
#: a few parameter copies from run to run. Every tool's child runs in it.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}


def load_fixed_costs() -> None:
    """Load what any curvature tool loads on its first products before the baseline is taken,
    so that a peak counts what grows with the model, not one-off library loads: torch's
    symbolic-shape module (and sympy with it), which autograd imports on the first backward
    with explicit output gradients, and scipy's sparse eigensolvers. Every tool's measurement
    calls this, so the comparison stays even."""
    import scipy.linalg
    import scipy.sparse.linalg  # noqa: F401
    import torch

    x = torch.ones(2, requires_grad=True)
    torch.autograd.grad((x * x).sum(), x, torch.ones(()), create_graph=True)


def write_results(path: str | Path, record: dict[str, Any]) -> None:
    """``record`` with torch's version and the machine, written atomically as JSON."""
    import torch

    record = {**record, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
