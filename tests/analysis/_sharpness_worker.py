"""Run under ``python -m torch.distributed.run --nproc-per-node 2`` (gloo, CPU) by
test_sharpness_distributed.py: every rank trains the same model with Adam, monitors it on its
own shard of the analysis data (out=OUT/monitor<rank>) and, rank-locally, on all of it;
writes the records to OUT/rank{r}.json."""

import json
import sys

import torch
import torch.distributed as dist

import hesslens as hl


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                                torch.nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(17, 5, generator=g, dtype=torch.float64)
    y = torch.randn(17, 3, generator=g, dtype=torch.float64)
    shard = (x[:7], y[:7]) if rank == 0 else (x[7:], y[7:])  # uneven shards
    loss_fn = torch.nn.functional.mse_loss
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    monitors = {
        "shard": hl.SharpnessMonitor(model, loss_fn, shard, opt, every=2, k=2,
                                     out=f"{out}/monitor{rank}", tol=1e-10),
        "whole": hl.SharpnessMonitor(model, loss_fn, (x, y), opt, every=2, k=2, tol=1e-10,
                                     hessian_options={"distributed": False}),
    }
    for step in range(5):
        opt.zero_grad()
        loss_fn(model(x), y).backward()  # the whole batch on every rank: the same weights
        opt.step()
        for mon in monitors.values():
            mon.update(step)
    keep = ("step", "eigenvalues", "sharpness", "preconditioned_sharpness", "threshold",
            "directional_sharpness", "gradient_share", "overlap", "loss", "n_hvp")
    result = {name: [{k: r[k] for k in keep} for r in mon.history]
              for name, mon in monitors.items()}
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
