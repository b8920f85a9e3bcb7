"""Run under ``python -m torch.distributed.run --nproc-per-node 2`` (gloo, CPU) by
test_distributed.py: each rank analyses its shard of uneven batches with a data-parallel
operator, and the whole data rank-locally, and writes both results to OUT/rank{r}.json."""

import json
import sys

import torch
import torch.distributed as dist

import hesslens as hl


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                                torch.nn.Linear(7, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 5, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (n,), generator=g)) for n in (7, 5, 3, 2)]
    shards = {0: batches[:1], 1: batches[1:]}  # uneven: 7 samples against 10
    loss_fn = torch.nn.functional.cross_entropy
    H = hl.Hessian(model, loss_fn, shards[rank])
    local = hl.Hessian(model, loss_fn, batches, distributed=False)
    V = torch.randn(3, H.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    result = {}
    for name, op in (("shard", H), ("whole", local)):
        full, layers = op.traces(rtol=0.05, seed=3)
        loss, grad = op.loss_and_gradient()
        result[name] = {
            "num_samples": op.num_samples,
            "products": op.hvp(V).tolist(),
            "gn_products": op.gauss_newton().hvp(V).tolist(),
            "top3": op.eigenvalues(k=3, seed=4).values.tolist(),
            "trace": op.trace(seed=5).value,
            "full_trace": full.value,
            "layer_traces": {k: v.value for k, v in layers.items()},
            "block_top": op.block("2").eigenvalues(k=1).values.tolist(),
            "density_nodes": op.density(n_probes=2, n_steps=20, deflate=2).nodes.tolist(),
            "loss": loss,
            "grad": grad.tolist(),
        }
    result["world"] = world
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
