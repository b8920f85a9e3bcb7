"""HessianTracePenalty(curvature='gauss_newton' | 'fisher') against dense float64 references,
and the warning when the Hessian penalty's running estimate turns negative."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from hesslens.curvature.blocks import ParamSlice
from hesslens.errors import HesslensInputError
from hesslens.training.config import TrainConfig, arm_key, arm_label
from hesslens.training.layers_select import select_layers
from hesslens.training.penalty import HessianTracePenalty, NegativeCurvatureWarning
from hesslens.training.penalty_forms import coupled_fisher_trace, empirical_fisher_trace
from tests.training._htr_dense import DenseCurvature, tanh_mlp

CE = nn.functional.cross_entropy
MSE = nn.functional.mse_loss


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mlp(act=nn.Tanh, bias=True, seed=0, out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4, bias=bias), act(), nn.Linear(4, 4, bias=bias), act(),
                         nn.Linear(4, out, bias=bias)).double()


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Conv1d(2, 2, 3, bias=False),
                         nn.GELU(), nn.Flatten(), nn.Linear(8, 3)).double()


def _bn(train, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():  # running statistics away from (0, 1), so eval mode is a real affine map
        net[1].running_mean.uniform_(-0.5, 0.5, generator=_gen(7))
        net[1].running_var.uniform_(0.5, 2.0, generator=_gen(8))
        net[1].weight.uniform_(0.5, 1.5, generator=_gen(9))
    return net.train(train)


def _case(name):
    """(model, x, y, loss_fn) of one small float64 problem."""
    g = _gen(1)
    if name == "cnn_relu_gelu":
        model = _cnn()
        x = torch.randn(6, 1, 8, generator=g, dtype=torch.float64)
        return model, x, torch.randint(0, 3, (6,), generator=g), CE
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (6,), generator=g)
    if name == "tanh_mlp":
        model = tanh_mlp((3, 3, 3, 3, 3, 3))
        return model.eval(), x, labels, CE
    if name == "gelu_no_bias":
        return _mlp(nn.GELU, bias=False), x, labels, CE
    if name == "relu_mse":
        return _mlp(nn.ReLU), x, torch.randn(6, 3, generator=g, dtype=torch.float64), MSE
    if name == "soft_targets":
        return _mlp(), x, torch.softmax(torch.randn(6, 3, generator=g, dtype=torch.float64), 1), CE
    if name == "batchnorm_eval":
        return _bn(train=False), x, labels, CE
    if name == "batchnorm_train":
        return _bn(train=True), x, labels, CE
    raise KeyError(name)


CASES = ["tanh_mlp", "cnn_relu_gelu", "gelu_no_bias", "relu_mse", "soft_targets",
         "batchnorm_eval", "batchnorm_train"]


def _chosen(model, layers):
    return [n for ns in select_layers(model, layers).values() for n in ns]


def _basis(pen):
    """All unit vectors of the chosen block, as probes: their mean form is tr(G) / n exactly."""
    params = pen.parameters()
    sizes = [p.numel() for p in params]
    eye = torch.eye(sum(sizes), dtype=params[0].dtype)
    return [[t.view(p.shape) for t, p in zip(row.split(sizes), params)] for row in eye]


def _model_grad(model):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in model.parameters()])


def _layers_of(model):
    n = len(select_layers(model, "all"))
    return ["all", "middle", [list(select_layers(model, "all"))[n - 1]]]


# ---------------------------------------------------------------------------- Gauss-Newton
@pytest.mark.parametrize("case", CASES)
def test_gauss_newton_over_a_basis_is_the_block_trace_and_its_gradient(case):
    model, x, y, loss_fn = _case(case)
    for layers in _layers_of(model):
        pen = HessianTracePenalty(model, layers=layers, curvature="gauss_newton", loss_fn=loss_fn)
        dense = DenseCurvature(model, x, y, loss_fn, _chosen(model, layers))
        probes = _basis(pen)
        model.zero_grad()
        value = pen(loss_fn(model(x), y), inputs=x, targets=y, probes=probes) * len(probes)
        value.backward()
        exact = dense.gauss_newton_trace()
        assert float(exact) > 1e-4  # a block with curvature: the comparison can fail
        torch.testing.assert_close(value.detach(), exact, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(_model_grad(model), dense.grad_of(dense.gauss_newton_trace),
                                   rtol=1e-8, atol=1e-10)


def _output_basis(like):
    eye = torch.eye(like.numel(), dtype=like.dtype)
    return [row.view(like.shape) for row in eye]


def _general(loss_fn):
    """The same loss behind a wrapper the penalty does not recognise: the general path."""
    return lambda z, y: loss_fn(z, y)


@pytest.mark.parametrize("case", CASES)
def test_gauss_newton_output_space_forms_over_a_basis_are_the_block_trace(case):
    """Drawn probes for cross-entropy and MSE live in the output space: ||J^T S u||^2 with
    S S^T = H_z; summed over the unit vectors u of that space it is tr(G) exactly."""
    model, x, y, loss_fn = _case(case)
    for layers in _layers_of(model):
        pen = HessianTracePenalty(model, layers=layers, curvature="gauss_newton", loss_fn=loss_fn)
        used = []

        def basis(like, n=None, used=used):
            used.append(like.shape)
            return _output_basis(like)

        pen.sample_output_probes = basis
        dense = DenseCurvature(model, x, y, loss_fn, _chosen(model, layers))
        model.zero_grad()
        value = pen(loss_fn(model(x), y), inputs=x, targets=y) * y.shape[0] * 3
        value.backward()
        assert used == [torch.Size([y.shape[0], 3])]  # the closed-form path was taken
        torch.testing.assert_close(value.detach(), dense.gauss_newton_trace(), rtol=1e-10,
                                   atol=1e-12)
        torch.testing.assert_close(_model_grad(model), dense.grad_of(dense.gauss_newton_trace),
                                   rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("module", [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(label_smoothing=0.2),
                                    nn.MSELoss()], ids=["ce", "ce_smooth", "mse"])
def test_loss_modules_take_the_output_space_path(module):
    model, x, y, _ = _case("relu_mse" if isinstance(module, nn.MSELoss) else "tanh_mlp")
    pen = HessianTracePenalty(model, curvature="gauss_newton", loss_fn=module)
    pen.sample_output_probes = lambda like, n=None: _output_basis(like)
    value = float(pen(module(model(x), y), inputs=x, targets=y).detach()) * y.shape[0] * 3
    dense = DenseCurvature(model, x, y, module, _chosen(model, "all"))
    assert value == pytest.approx(float(dense.gauss_newton_trace()), rel=1e-10)


@pytest.mark.parametrize("loss_fn", [
    nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)),
    _general(CE),
    lambda z, y: nn.functional.huber_loss(z, nn.functional.one_hot(y, 3).double()),
], ids=["weighted_ce", "wrapped_ce", "huber"])
def test_other_losses_take_the_parameter_space_path(loss_fn):
    model, x, y, _ = _case("tanh_mlp")
    pen = HessianTracePenalty(model, curvature="gauss_newton", loss_fn=loss_fn, n_probes=2)

    def refuse(like, n=None):
        raise AssertionError("the output-space path has no closed form for this loss")

    pen.sample_output_probes = refuse
    pen(loss_fn(model(x), y), inputs=x, targets=y)  # parameter-space probes, no error
    assert pen.state_dict()["draws"] == 2


def test_ignored_labels_take_the_parameter_space_path():
    model, x, y, loss_fn = _case("tanh_mlp")
    y = y.clone()
    y[0] = -100  # cross_entropy's ignore_index: that row has no weight
    pen = HessianTracePenalty(model, curvature="gauss_newton", loss_fn=loss_fn)
    probes = _basis(pen)
    value = float(pen(loss_fn(model(x), y), inputs=x, targets=y, probes=probes).detach())
    dense = DenseCurvature(model, x, y, loss_fn, _chosen(model, "all"))
    assert value * len(probes) == pytest.approx(float(dense.gauss_newton_trace()), rel=1e-10)
    pen.sample_output_probes = lambda like, n=None: pytest.fail("closed form with ignored rows")
    pen(loss_fn(model(x), y), inputs=x, targets=y)
    y[0] = 1
    module = nn.CrossEntropyLoss(ignore_index=1)  # a class index that the loss ignores
    pen = HessianTracePenalty(model, curvature="gauss_newton", loss_fn=module)
    pen.sample_output_probes = lambda like, n=None: pytest.fail("closed form with ignored rows")
    pen(module(model(x), y), inputs=x, targets=y)
    fisher = HessianTracePenalty(model, curvature="fisher", loss_fn=module)
    with pytest.raises(HesslensInputError, match="not the mean of the per-sample losses"):
        fisher(module(model(x), y), inputs=x, targets=y)  # an ignored sample's loss is 0/0


@pytest.mark.parametrize("wrap", [False, True], ids=["output_space", "parameter_space"])
@pytest.mark.parametrize("case", ["tanh_mlp", "relu_mse", "batchnorm_train"])
def test_gauss_newton_mean_over_rademacher_draws_is_the_block_trace(case, wrap):
    model, x, y, loss_fn = _case(case)
    loss_fn = _general(loss_fn) if wrap else loss_fn
    n = 2000
    pen = HessianTracePenalty(model, layers="middle", curvature="gauss_newton", loss_fn=loss_fn,
                              n_probes=n, seed=4)
    target = float(DenseCurvature(model, x, y, loss_fn, _chosen(model, "middle"))
                   .gauss_newton_trace())
    # one Rademacher form u^T M u of a PSD M has variance 2 sum_{i!=j} M_ij^2 <= 2 tr(M)^2
    se = target * math.sqrt(2 / n)
    value = float(pen(loss_fn(model(x), y), inputs=x, targets=y).detach())
    assert abs(value - target) < 4 * se, (value, target, se)


@pytest.mark.parametrize("wrap", [False, True], ids=["output_space", "parameter_space"])
def test_gaussian_probes_have_the_same_mean(wrap):
    model, x, y, loss_fn = _case("cnn_relu_gelu")
    loss_fn = _general(loss_fn) if wrap else loss_fn
    n = 2000
    pen = HessianTracePenalty(model, layers="2,5", curvature="gauss_newton", loss_fn=loss_fn,
                              n_probes=n, seed=8, distribution="gaussian")
    target = float(DenseCurvature(model, x, y, loss_fn, _chosen(model, ["2", "5"]))
                   .gauss_newton_trace())
    se = target * math.sqrt(2 / n)  # a Gaussian form's variance is 2 ||M||_F^2 <= 2 tr(M)^2
    value = float(pen(loss_fn(model(x), y), inputs=x, targets=y).detach())
    assert abs(value - target) < 4 * se, (value, target, se)


def test_gauss_newton_forms_are_never_negative():
    model, x, y, loss_fn = _case("cnn_relu_gelu")
    pen = HessianTracePenalty(model, curvature="gauss_newton", loss_fn=loss_fn, seed=0)
    for _ in range(20):
        assert float(pen(loss_fn(model(x), y), inputs=x, targets=y).detach()) >= 0


@pytest.mark.parametrize("curvature", ["gauss_newton", "fisher"])
def test_a_sliced_block_takes_the_trace_of_its_slice_only(curvature):
    model, x, y, loss_fn = _case("tanh_mlp")
    grouping = {"top": [ParamSlice("4.weight", dim=0, start=1, stop=3)]}  # rows 1, 2 of 3
    pen = HessianTracePenalty(model, layers=grouping, curvature=curvature, loss_fn=loss_fn)
    dense = DenseCurvature(model, x, y, loss_fn, ["4.weight"])
    inside = torch.arange(9) >= 3
    loss = loss_fn(model(x), y)
    if curvature == "gauss_newton":
        diag = torch.diagonal(dense.gauss_newton())
        probes = [[v[0] * pen._masks[0]] for v in _basis(pen)]
        value = float(pen(loss, inputs=x, targets=y, probes=probes).detach()) * len(probes)
        pen.sample_output_probes = lambda like, n=None: _output_basis(like)
        output_space = float(pen(loss, inputs=x, targets=y).detach()) * x.shape[0] * 3
        assert output_space == pytest.approx(value, rel=1e-10)
    else:
        diag = (dense.per_sample_gradients() ** 2).mean(0)
        value = float(pen(loss, inputs=x, targets=y).detach())
    assert value == pytest.approx(float(diag[inside].sum()), rel=1e-10)
    assert float(diag[~inside].sum()) > 1e-3 * value  # the whole weight would differ


# ---------------------------------------------------------------------------- Fisher
@pytest.mark.parametrize("case", CASES)
def test_fisher_is_the_mean_squared_per_sample_gradient_and_its_gradient(case):
    """Per-sample gradients of each sample alone; with BatchNorm in training mode, of each loss
    term of the batch pass (through the batch statistics)."""
    model, x, y, loss_fn = _case(case)
    coupled = case == "batchnorm_train"
    for layers in _layers_of(model):
        pen = HessianTracePenalty(model, layers=layers, curvature="fisher", loss_fn=loss_fn)
        dense = DenseCurvature(model, x, y, loss_fn, _chosen(model, layers))
        model.zero_grad()
        value = pen(loss_fn(model(x), y), inputs=x, targets=y)
        value.backward()
        exact = dense.fisher_trace(coupled=coupled)
        assert float(exact) > 1e-4
        torch.testing.assert_close(value.detach(), exact, rtol=1e-10, atol=1e-12)
        grad = dense.grad_of(lambda t, d=dense: d.fisher_trace(t, coupled=coupled))
        torch.testing.assert_close(_model_grad(model), grad, rtol=1e-8, atol=1e-10)


def test_both_fisher_paths_agree_where_samples_are_independent():
    model, x, y, loss_fn = _case("batchnorm_eval")
    params = list(model.parameters())
    slots = [(n, i) for i, (n, _) in enumerate(model.named_parameters())]
    alone, mean_alone = empirical_fisher_trace(model, slots, params, x, y, loss_fn)
    terms, mean_terms = coupled_fisher_trace(model(x), y, loss_fn, params)
    torch.testing.assert_close(terms, alone, rtol=1e-12, atol=0)
    torch.testing.assert_close(mean_terms, mean_alone, rtol=1e-12, atol=0)


def test_fisher_with_batch_statistics_is_not_the_one_sample_definition():
    model, x, y, loss_fn = _case("batchnorm_train")
    dense = DenseCurvature(model, x, y, loss_fn, _chosen(model, "all"))
    pen = HessianTracePenalty(model, curvature="fisher", loss_fn=loss_fn)
    with pytest.warns(UserWarning, match=r"\['1'\] normalising by batch statistics"):
        value = float(pen(loss_fn(model(x), y), inputs=x, targets=y).detach())
    # (a batch of one sample normalises it to zero: its own loss is flat in the first layer)
    assert abs(value - float(dense.fisher_trace(coupled=False))) > 0.05 * value


def test_fisher_is_not_the_squared_norm_of_the_batch_gradient():
    model, x, y, loss_fn = _case("tanh_mlp")
    pen = HessianTracePenalty(model, curvature="fisher", loss_fn=loss_fn)
    loss = loss_fn(model(x), y)
    g = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    batch_grad_sq = float(sum((t**2).sum() for t in g))
    value = float(pen(loss, inputs=x, targets=y).detach())
    assert value > 1.5 * batch_grad_sq  # per-sample norms: the batch mean averages noise away


@pytest.mark.parametrize("bad", [
    lambda z, y: nn.functional.cross_entropy(z, y, reduction="sum"),
    lambda z, y: nn.functional.cross_entropy(z, y, weight=torch.tensor([1.0, 5.0, 0.2],
                                                                       dtype=torch.float64)),
])
def test_fisher_refuses_a_loss_that_is_not_a_mean_over_samples(bad):
    model, x, y, _ = _case("tanh_mlp")
    pen = HessianTracePenalty(model, curvature="fisher", loss_fn=bad)
    with pytest.raises(HesslensInputError, match="not the mean of the per-sample losses"):
        pen(bad(model(x), y), inputs=x, targets=y)


def test_fisher_leaves_the_probe_stream_alone():
    model, x, y, loss_fn = _case("tanh_mlp")
    pen = HessianTracePenalty(model, curvature="fisher", loss_fn=loss_fn, seed=3)
    before = pen.state_dict()
    pen(loss_fn(model(x), y), inputs=x, targets=y)
    assert pen.state_dict()["draws"] == before["draws"] == 0


# ---------------------------------------------------------------------------- both
@pytest.mark.parametrize("curvature", ["gauss_newton", "fisher"])
def test_penalty_trains_with_an_optimizer_and_keeps_batchnorm_statistics(curvature):
    model, x, y, loss_fn = _case("batchnorm_train")
    pen = HessianTracePenalty(model, layers="middle", curvature=curvature, loss_fn=loss_fn,
                              seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    out = model(x)
    after_training_pass = [b.clone() for b in model.buffers()]
    loss = loss_fn(out, y)
    (loss + 0.1 * pen(loss, inputs=x, targets=y)).backward()
    # the penalty reaches the first layer, which it does not penalise (layers='middle')
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    assert not torch.equal(before[0], model[0].weight)  # (a bias before BatchNorm has no grad)
    # the penalty's own passes leave the running statistics as the training pass left them
    for b, e in zip(model.buffers(), after_training_pass):
        assert torch.equal(b, e)


@pytest.mark.parametrize("curvature", ["gauss_newton", "fisher"])
def test_errors_name_the_problem(curvature):
    model, x, y, loss_fn = _case("tanh_mlp")
    with pytest.raises(HesslensInputError, match="needs loss_fn"):
        HessianTracePenalty(model, curvature=curvature)
    with pytest.raises(HesslensInputError, match="method='fd' is for curvature='hessian'"):
        HessianTracePenalty(model, curvature=curvature, method="fd", loss_fn=loss_fn)
    pen = HessianTracePenalty(model, curvature=curvature, loss_fn=loss_fn)
    with pytest.raises(HesslensInputError, match=r"pen\(loss, inputs=x, targets=y\)"):
        pen(loss_fn(model(x), y))


def test_unknown_curvature_is_named():
    with pytest.raises(HesslensInputError, match=r"unknown curvature 'ggn'.*gauss_newton"):
        HessianTracePenalty(tanh_mlp(), curvature="ggn", loss_fn=CE)


def test_repr_and_state_dict_of_a_gauss_newton_penalty():
    model, x, y, loss_fn = _case("tanh_mlp")
    pen = HessianTracePenalty(model, curvature="gauss_newton", loss_fn=loss_fn, seed=11)
    assert "curvature='gauss_newton'" in repr(pen)
    pen(loss_fn(model(x), y), inputs=x, targets=y)
    state = pen.state_dict()
    a = pen(loss_fn(model(x), y), inputs=x, targets=y)
    again = HessianTracePenalty(model, curvature="gauss_newton", loss_fn=loss_fn, seed=0)
    again.load_state_dict(state)
    b = again(loss_fn(model(x), y), inputs=x, targets=y)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------- negative trace
class _Quadratic(nn.Module):
    """loss = sign * ||w||^2 / 2: Hessian sign * I, every quadratic form of one sign."""

    def __init__(self, sign):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4, dtype=torch.float64))
        self.sign = sign

    def loss(self):
        return self.sign * 0.5 * (self.w**2).sum() + 0 * self.w.sum()


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_negative_running_hessian_trace_warns_once(distribution):
    model = _Quadratic(-1.0)
    pen = HessianTracePenalty(model, distribution=distribution, seed=0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(9):  # too few values to judge
            pen(model.loss())
        assert not [w for w in seen if issubclass(w.category, NegativeCurvatureWarning)]
        for _ in range(30):
            pen(model.loss())
    hits = [w for w in seen if issubclass(w.category, NegativeCurvatureWarning)]
    assert len(hits) == 1
    resumed = HessianTracePenalty(model, distribution=distribution, seed=0)
    resumed.load_state_dict(pen.state_dict())  # a resumed run neither forgets nor repeats
    assert resumed.running_trace == pen.running_trace
    with warnings.catch_warnings():
        warnings.simplefilter("error", NegativeCurvatureWarning)
        resumed(model.loss())
    assert "gauss_newton" in str(hits[0].message) and "fisher" in str(hits[0].message)
    assert pen.running_trace < 0


def test_positive_or_noisy_hessian_trace_does_not_warn():
    model = _Quadratic(1.0)
    pen = HessianTracePenalty(model, seed=0)
    net, x, y, _ = _case("tanh_mlp")
    pen_net = HessianTracePenalty(net, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NegativeCurvatureWarning)
        for _ in range(60):
            pen(model.loss())
            pen_net(CE(net(x), y))  # trace 0.13, one probe's spread about 2
    assert pen.running_trace == pytest.approx(4.0)


def test_gauss_newton_and_fisher_never_warn_about_sign():
    model, x, y, loss_fn = _case("tanh_mlp")
    for curvature in ("gauss_newton", "fisher"):
        pen = HessianTracePenalty(model, curvature=curvature, loss_fn=loss_fn, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", NegativeCurvatureWarning)
            for _ in range(6):
                pen(loss_fn(model(x), y), inputs=x, targets=y)


# ---------------------------------------------------------------------------- config
def test_config_field_is_validated_and_round_trips():
    cfg = TrainConfig(htr_gamma=1e-3, htr_curvature="gauss_newton").validate()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert arm_label(cfg) == "SGD+HTR(1e-03, all, gauss_newton, every 1)"
    with pytest.raises(HesslensInputError, match="unknown htr_curvature 'ggn'"):
        TrainConfig(htr_curvature="ggn").validate()
    with pytest.raises(HesslensInputError, match="htr_method='fd' is for the Hessian only"):
        TrainConfig(htr_curvature="fisher", htr_method="fd").validate()


def test_arm_key_of_a_run_saved_before_the_field_is_unchanged():
    old = TrainConfig(htr_gamma=1e-3).to_dict()
    del old["htr_curvature"]
    assert arm_key(old) == arm_key(TrainConfig(htr_gamma=1e-3))
    assert arm_key(TrainConfig(htr_gamma=1e-3, htr_curvature="fisher")) != arm_key(old)


@pytest.mark.parametrize("curvature", ["gauss_newton", "fisher"])
def test_active_dropout_runs_and_leaves_the_random_stream_alone(curvature):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double()
    x = torch.randn(6, 3, generator=_gen(2), dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=_gen(3))
    pen = HessianTracePenalty(model, curvature=curvature, loss_fn=CE, seed=0)
    loss = CE(model(x), y)
    state = torch.get_rng_state()
    value = pen(loss, inputs=x, targets=y)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.isfinite(value) and float(value.detach()) > 0
    value.backward()


def _bce(z, y):
    return nn.functional.binary_cross_entropy_with_logits(z, y)


@pytest.mark.parametrize("curvature", ["gauss_newton", "fisher"])
def test_binary_logits_with_bce_take_the_general_path(curvature):
    model = _mlp(out=1)
    x = torch.randn(6, 3, generator=_gen(5), dtype=torch.float64)
    y = torch.randint(0, 2, (6, 1), generator=_gen(6)).double()
    pen = HessianTracePenalty(model, layers="middle", curvature=curvature, loss_fn=_bce)
    dense = DenseCurvature(model, x, y, _bce, _chosen(model, "middle"))
    model.zero_grad()
    if curvature == "gauss_newton":
        probes = _basis(pen)
        value = pen(_bce(model(x), y), inputs=x, targets=y, probes=probes) * len(probes)
        exact, fn = dense.gauss_newton_trace(), dense.gauss_newton_trace
    else:
        value = pen(_bce(model(x), y), inputs=x, targets=y)
        exact, fn = dense.fisher_trace(), dense.fisher_trace
    value.backward()
    torch.testing.assert_close(value.detach(), exact, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_model_grad(model), dense.grad_of(fn), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("curvature", ["gauss_newton", "fisher"])
def test_float32_models_agree_with_float64(curvature):
    import copy

    model64, x64, y, loss_fn = _case("cnn_relu_gelu")
    model32, x32 = copy.deepcopy(model64).float(), x64.float()
    values = []
    for model, x in ((model64, x64), (model32, x32)):
        pen = HessianTracePenalty(model, curvature=curvature, loss_fn=loss_fn)
        pen.sample_output_probes = lambda like, n=None: _output_basis(like)
        values.append(float(pen(loss_fn(model(x), y), inputs=x, targets=y).detach()))
    assert values[1] == pytest.approx(values[0], rel=1e-4)
