"""Stability thresholds read from optimizers: the formulas, and PyTorch's own optimizers on a
quadratic, stable just below the threshold and unstable just above it."""

from __future__ import annotations

import warnings

import pytest
import torch

from hesslens.analysis.thresholds import (
    adam_threshold,
    preconditioner,
    sgd_threshold,
    stability_rule,
    unwrap_optimizer,
)
from hesslens.errors import HesslensInputError


def _params():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    return net, list(net.parameters())


@pytest.mark.parametrize("options, expected", [
    ({"lr": 0.1}, 20.0),
    ({"lr": 0.05, "momentum": 0.9}, 76.0),
    ({"lr": 0.1, "momentum": 0.5, "nesterov": True}, 15.0),
    ({"lr": 0.1, "momentum": 0.9, "nesterov": True}, 2 / 0.1 * 1.9 / 2.8),
    ({"lr": 0.1, "momentum": 0.9, "dampening": 0.5}, 76.0),
    ({"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}, 38.0 - 0.01),
])
def test_sgd_thresholds(options, expected):
    _, params = _params()
    rule = stability_rule(torch.optim.SGD(params, **options), params)
    assert rule.family == "sgd" and rule.compared == "sharpness"
    assert rule.threshold == pytest.approx(expected, rel=1e-12)
    assert rule.lr == options["lr"]


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_threshold_is_38_over_lr_for_beta1_09(cls):
    _, params = _params()
    rule = stability_rule(cls(params, lr=2e-3), params)
    assert rule.threshold == pytest.approx(38 / 2e-3, rel=1e-12)
    assert rule.compared == "preconditioned_sharpness"
    rule = stability_rule(cls(params, lr=1e-3, betas=(0.5, 0.99)), params)
    assert rule.threshold == pytest.approx(6 / 1e-3, rel=1e-12)


def _iterate(opt_factory, a, steps=1500):
    """|theta| after ``steps`` of the optimizer on L = a theta^2 / 2 from theta = 1."""
    theta = torch.ones(1, dtype=torch.float64, requires_grad=True)
    opt = opt_factory([theta])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * a * theta**2).sum().backward()
        opt.step()
        if not torch.isfinite(theta).all() or theta.abs().item() > 1e6:
            return float("inf")
    return theta.abs().item()


@pytest.mark.parametrize("options", [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.9},
    {"lr": 0.1, "momentum": 0.6, "nesterov": True},
    {"lr": 0.1, "momentum": 0.9, "dampening": 0.9},  # Adam's momentum: 38 / lr
    {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.5},
])
def test_pytorch_sgd_is_stable_just_below_the_threshold_and_not_above(options):
    _, params = _params()
    threshold = stability_rule(torch.optim.SGD(params, **options), params).threshold

    def factory(ps):
        return torch.optim.SGD(ps, **options)

    assert _iterate(factory, threshold * 0.98) < 1.0
    assert _iterate(factory, threshold * 1.02) > 1e3


def test_groups_with_other_learning_rates_become_a_preconditioner():
    net, params = _params()
    opt = torch.optim.SGD([{"params": net[0].parameters(), "lr": 0.1},
                           {"params": net[1].parameters(), "lr": 0.025, "weight_decay": 0.2}],
                          momentum=0.9)
    named = list(net.named_parameters())
    rule = stability_rule(opt, params)
    assert rule.compared == "preconditioned_sharpness" and rule.lr == 0.1
    assert rule.threshold == pytest.approx(38.0)
    P, S = preconditioner(opt, named, rule)
    assert float(P["0.weight"].unique()) == 1.0 and float(P["1.bias"].unique()) == 4.0
    assert float(S["0.weight"].unique()) == 0.0 and float(S["1.weight"].unique()) == 0.2


def test_a_parameter_outside_the_optimizer_does_not_move():
    net, params = _params()
    opt = torch.optim.SGD(net[0].parameters(), lr=0.1)
    rule = stability_rule(opt, params)
    assert rule.compared == "preconditioned_sharpness"
    P, _ = preconditioner(opt, list(net.named_parameters()), rule) or (None, None)
    assert torch.isinf(P["1.weight"]).all() and (P["0.weight"] == 1.0).all()


def test_groups_that_differ_in_momentum_are_refused_with_the_fix():
    net, params = _params()
    opt = torch.optim.SGD([{"params": net[0].parameters(), "momentum": 0.9},
                           {"params": net[1].parameters(), "momentum": 0.5}], lr=0.1)
    with pytest.raises(HesslensInputError, match=r"differ in 'momentum'.*optimizer=None"):
        stability_rule(opt, params)
    adam = torch.optim.Adam([{"params": net[0].parameters(), "betas": (0.9, 0.999)},
                             {"params": net[1].parameters(), "betas": (0.8, 0.999)}])
    with pytest.raises(HesslensInputError, match="differ in 'betas'"):
        stability_rule(adam, params)


def test_unknown_optimizer_gives_no_threshold_and_names_the_supported_ones():
    _, params = _params()
    supported = r"torch\.optim\.SGD, torch\.optim\.Adam, torch\.optim\.AdamW"
    with pytest.warns(UserWarning, match=supported):
        rule = stability_rule(torch.optim.RMSprop(params, lr=0.01), params)
    assert rule.threshold is None and rule.family is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stability_rule(torch.optim.RMSprop(params), params, warn=False).threshold is None


def test_adam_preconditioner_is_what_adam_divides_its_momentum_by():
    # After a step, Adam moved theta by -lr * m / P, with m its (uncorrected) first moment:
    # the P of Cohen et al. 2022, bias corrections and eps included.
    torch.manual_seed(1)
    net = torch.nn.Linear(5, 3).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)
    for cls, options in ((torch.optim.Adam, {}), (torch.optim.Adam, {"amsgrad": True}),
                         (torch.optim.AdamW, {"weight_decay": 0.0})):
        opt = cls(net.parameters(), lr=1e-2, eps=1e-3, **options)
        named = list(net.named_parameters())
        rule = stability_rule(opt, [p for _, p in named])
        assert preconditioner(opt, named, rule) is None  # no state before the first step
        for _ in range(3):
            before = {n: p.detach().clone() for n, p in named}
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
            P, S = preconditioner(opt, named, rule)
            assert S is None
            for n, p in named:
                m = opt.state[p]["exp_avg"]
                torch.testing.assert_close(p.detach() - before[n], -1e-2 * m / P[n],
                                           rtol=1e-10, atol=1e-14)


def test_wrapped_optimizers_are_unwrapped():
    _, params = _params()
    inner = torch.optim.SGD(params, lr=0.1)

    class Wrapper:
        optimizer = inner

    assert unwrap_optimizer(Wrapper()) is inner
    assert sgd_threshold(0.0) == float("inf")
    assert adam_threshold(0.1, 0.0) == pytest.approx(20.0)
