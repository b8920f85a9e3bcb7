"""The data-parallel helpers alone (no processes): the batch split covers every example once in
contiguous pieces of near-equal size, and a process started by torchrun without a process group
is refused by name instead of training the whole run W times into one folder."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from hesslens.errors import HesslensInputError
from hesslens.parallel import Ranks, env_world_size, resolve_device, shard, shard_range
from hesslens.training import TrainConfig, train
from hesslens.training.trainer import TensorData


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 16, 49])
def test_shard_range_splits_into_contiguous_near_equal_pieces(n, world):
    pieces = [shard_range(n, r, world) for r in range(world)]
    assert pieces[0][0] == 0 and pieces[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))  # contiguous, in rank order
    sizes = [b - a for a, b in pieces]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_takes_this_ranks_rows():
    x = torch.arange(7)
    assert [shard(x, Ranks(r, 3)).tolist() for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]


def test_torchrun_without_a_process_group_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert env_world_size() == 2
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    data = TensorData(x, y, x, y, num_classes=2)
    with pytest.raises(HesslensInputError, match=r"WORLD_SIZE=2.*not initialised"):
        train(TrainConfig(epochs=1, batch_size=4, val_fraction=0.0), tmp_path / "run",
              progress=False, model=nn.Linear(3, 2), dataset=data)
    assert not (tmp_path / "run").exists()


def test_one_device_resolver_for_the_commands_and_the_trainer(monkeypatch):
    from hesslens.experiments import common

    assert common.resolve_device is resolve_device  # the commands re-export it, not a copy
    assert resolve_device(None) == resolve_device("") == resolve_device(" cpu ") == \
        torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(HesslensInputError, match="unknown device 'tpu:0'"):
        resolve_device("tpu:0")
    with pytest.raises(HesslensInputError, match="unsupported device 'meta'"):
        resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(HesslensInputError, match="'cuda:0' asked for, but CUDA is not available"):
        resolve_device("cuda:0")
    # under torchrun a bare "cuda" is this rank's GPU: the error names it
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(HesslensInputError, match="'cuda:1' asked for"):
        resolve_device("cuda", Ranks(1, 2))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(HesslensInputError, match="there are only 1 CUDA device"):
        resolve_device("cuda", Ranks(1, 2))
    assert resolve_device("cuda:0") == torch.device("cuda:0")
