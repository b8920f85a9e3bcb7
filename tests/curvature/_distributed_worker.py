"""Run under ``python -m torch.distributed.run --nproc-per-node 2`` (gloo, CPU) by
test_distributed.py: each rank analyses its shard of uneven batches with a data-parallel
operator, and the whole data rank-locally, and writes both results to OUT/rank{r}.json."""

import json
import os
import sys

import torch
import torch.distributed as dist

import hesslens as hl


def threads() -> int:
    """This process's threads (gloo runs its own while a process group lives)."""
    return len(os.listdir("/proc/self/task"))


def main(out: str) -> None:
    before = threads()
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
    result["failures"] = failures(model, loss_fn, shards[rank], rank, V)
    # the operators, still alive, must not keep the group (and its threads) past its end
    dist.destroy_process_group()
    result["threads_left"] = threads() - before
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)


class Shard:
    """A re-iterable shard (iterated again on every pass, so checked on every pass) whose
    inputs change from pass ``change_at`` on, on rank 1 only."""

    def __init__(self, batches: list, rank: int, change_at: int) -> None:
        self.batches, self.change = batches, rank == 1
        self.change_at, self.passes = change_at, 0

    def __iter__(self):
        self.passes += 1
        for x, y in self.batches:
            yield (x + 1.0 if self.change and self.passes >= self.change_at else x), y


def failures(model, loss_fn, shard: list, rank: int, V: torch.Tensor) -> dict:
    """The error each rank raises when only rank 1's data is bad: at construction (its data
    changes on the operator's second pass, or its loss is not finite) and in a product (its
    data changes on the third pass); then a product on good data, which every rank must reach
    in step with the others."""
    nan = [(x * float("nan"), y) for x, y in shard] if rank == 1 else shard
    cases = {
        "construction": lambda: hl.Hessian(model, loss_fn, Shard(shard, rank, 2)),
        "nan_loss": lambda: hl.Hessian(model, loss_fn, nan),
        "product": lambda: hl.Hessian(model, loss_fn, Shard(shard, rank, 3)).hvp(V),
    }
    out = {}
    for name, case in cases.items():
        try:
            case()
            out[name] = None
        except Exception as err:
            out[name] = type(err).__name__
    out["after"] = hl.Hessian(model, loss_fn, shard).hvp(V).sum().item()
    return out


if __name__ == "__main__":
    main(sys.argv[1])
