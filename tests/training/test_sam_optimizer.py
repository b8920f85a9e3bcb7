"""SAM: the two half-steps against a hand computation; BatchNorm statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hesslens.errors import HesslensInputError
from hesslens.training.sam import SAM, bn_stats_frozen

CE = nn.functional.cross_entropy


def _data(seed=0, n=10, d=3, k=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randint(0, k, (n,), generator=g))


def _grads(model, x, y):
    model.zero_grad()
    CE(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sam_step_matches_hand_computation(momentum):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = _data()
    rho, lr = 0.1, 0.05
    w0 = [p.detach().clone() for p in model.parameters()]
    ref = copy.deepcopy(model)

    # By hand: g at w, e = rho g / ||g||, g' at w + e, w <- w - lr g' (first momentum step: the
    # buffer is g', so momentum does not change the first update).
    g = _grads(ref, x, y)
    norm = torch.sqrt(sum((t**2).sum() for t in g))
    e = [rho * t / norm for t in g]
    with torch.no_grad():
        for p, ei in zip(ref.parameters(), e):
            p.add_(ei)
    g_pert = _grads(ref, x, y)
    expected = [w - lr * gp for w, gp in zip(w0, g_pert)]

    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, momentum=momentum)
    CE(model(x), y).backward()
    opt.first_step(zero_grad=True)
    for p, w, ei in zip(model.parameters(), w0, e):
        torch.testing.assert_close(p.detach(), w + ei, rtol=1e-9, atol=1e-12)
    perturbed_norm = torch.sqrt(sum(((p.detach() - w) ** 2).sum()
                                    for p, w in zip(model.parameters(), w0)))
    assert float(perturbed_norm) == pytest.approx(rho, rel=1e-10)
    CE(model(x), y).backward()
    opt.second_step(zero_grad=True)
    for p, w in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), w, rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_step_with_closure_equals_the_two_halves():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    b = copy.deepcopy(a)
    x, y = _data()
    oa = SAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    ob = SAM(b.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for _ in range(3):
        CE(a(x), y).backward()
        oa.first_step(zero_grad=True)
        CE(a(x), y).backward()
        oa.second_step(zero_grad=True)

        def closure():
            loss = CE(b(x), y)
            loss.backward()
            return loss

        ob.zero_grad()
        CE(b(x), y).backward()
        ob.step(closure)
        ob.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    with pytest.raises(HesslensInputError, match="closure"):
        ob.step()


def test_adaptive_sam_perturbation():
    model = nn.Linear(3, 2).double()
    x, y = _data()
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, adaptive=True, lr=0.1)
    CE(model(x), y).backward()
    g = [p.grad.clone() for p in model.parameters()]
    opt.first_step()
    norm = torch.sqrt(sum(((w.abs() * t) ** 2).sum() for w, t in zip(w0, g)))
    for p, w, t in zip(model.parameters(), w0, g):
        torch.testing.assert_close(p.detach(), w + 0.2 * w**2 * t / norm)


def test_bn_statistics_are_those_of_one_ordinary_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    plain = copy.deepcopy(model)
    plain(x)  # one ordinary training forward
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    CE(model(x), y).backward()
    opt.first_step(zero_grad=True)
    bn = model[1]
    ids = (id(bn.running_mean), id(bn.running_var))
    with bn_stats_frozen(model):
        out = model(x)
        # still normalised with the batch statistics (train mode), as in the first pass
        assert model.training
        CE(out, y).backward()
    opt.second_step(zero_grad=True)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), getattr(plain[1], name)), name
    assert (id(bn.running_mean), id(bn.running_var)) == ids
    # without the guard, the perturbed pass would have moved them
    unguarded = copy.deepcopy(plain)
    with torch.no_grad():
        for p in unguarded.parameters():
            p.add_(0.3)
    unguarded(x)
    assert not torch.equal(unguarded[1].running_mean, plain[1].running_mean)


def test_bn_stats_frozen_restores_after_an_exception():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError), bn_stats_frozen(model):
        model(torch.randn(8, 3))
        raise RuntimeError("boom")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_state_dict_round_trip_and_bad_rho():
    model = nn.Linear(3, 2)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    CE(model(x), y).backward()
    opt.first_step(zero_grad=True)
    CE(model(x), y).backward()
    opt.second_step(zero_grad=True)
    state = opt.state_dict()
    other = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    other.load_state_dict(state)
    assert other.param_groups is other.base_optimizer.param_groups
    for p in model.parameters():
        torch.testing.assert_close(other.base_optimizer.state[p]["momentum_buffer"],
                                   opt.base_optimizer.state[p]["momentum_buffer"])
    with pytest.raises(HesslensInputError, match="rho"):
        SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1)


def test_sam_momentum_over_several_steps_matches_sgd_on_perturbed_gradients():
    """SAM(SGD, momentum) = SGD(momentum) fed the gradients at w + rho g/||g||, step after
    step (the first step alone cannot tell momentum apart)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    ref = copy.deepcopy(model)
    x, y = _data()
    rho, lr, mom, wd = 0.1, 0.05, 0.9, 1e-3
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, momentum=mom,
              weight_decay=wd)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=mom, weight_decay=wd)
    for _ in range(4):
        g = _grads(ref, x, y)
        norm = torch.sqrt(sum((t**2).sum() for t in g))
        with torch.no_grad():
            for p, t in zip(ref.parameters(), g):
                p.add_(rho * t / norm)
        g_pert = _grads(ref, x, y)
        with torch.no_grad():
            for p, t in zip(ref.parameters(), g):
                p.sub_(rho * t / norm)
        for p, t in zip(ref.parameters(), g_pert):
            p.grad = t
        ref_opt.step()

        opt.zero_grad()
        CE(model(x), y).backward()
        opt.first_step(zero_grad=True)
        CE(model(x), y).backward()
        opt.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-12)
