"""Bad input gets an error that names the problem."""

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

import hesslens as hl
from hesslens.errors import CurvatureUnderflowError, HesslensInputError
from tests.reference import classification_batches, mlp


def _data():
    return classification_batches((6,), classes=4)


def test_non_scalar_loss():
    with pytest.raises(HesslensInputError, match="not a scalar"):
        hl.Hessian(mlp(), lambda o, y: cross_entropy(o, y, reduction="none"), _data())


def test_non_finite_loss():
    with pytest.raises(HesslensInputError, match="not finite"):
        hl.Hessian(mlp(), lambda o, y: cross_entropy(o, y) * float("nan"), _data())


def test_empty_data():
    with pytest.raises(HesslensInputError, match="empty"):
        hl.Hessian(mlp(), cross_entropy, [])


def test_unknown_layer_name():
    H = hl.Hessian(mlp(), cross_entropy, _data())
    with pytest.raises(HesslensInputError, match=r"unknown layer.*'nope'.*\['0', '2', '4'\]"):
        H.block("nope")


def test_model_without_trainable_parameters():
    model = mlp().requires_grad_(False)
    with pytest.raises(HesslensInputError, match="no trainable parameters"):
        hl.Hessian(model, cross_entropy, _data())


def test_k_larger_than_dimension():
    model = nn.Linear(2, 2)
    data = (torch.randn(4, 2), torch.randint(0, 2, (4,)))
    H = hl.Hessian(model, cross_entropy, data)
    with pytest.raises(HesslensInputError, match=r"k=7 is larger than .* dimension 6"):
        H.eigenvalues(k=7)


def test_dropout_in_train_mode_is_measured_off_and_says_so():
    model = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.5), nn.Linear(5, 4)).train()
    with pytest.warns(UserWarning, match=r"dropout is active.*measured with dropout off"):
        H_train = hl.Hessian(model, cross_entropy, _data(), path="reverse")
    H_eval = hl.Hessian(model.eval(), cross_entropy, _data(), path="reverse")
    V = torch.randn(3, H_eval.dim, generator=torch.Generator().manual_seed(0))
    assert torch.equal(H_train.hvp(V), H_eval.hvp(V))
    assert model.eval() is model and not model.training
    H = hl.Hessian(model.train(), cross_entropy, _data(), allow_dropout=True)
    for path in ("forward", "reverse"):  # vmapped and looped products both run
        H = hl.Hessian(model.train(), cross_entropy, _data(), allow_dropout=True, path=path)
        assert torch.isfinite(torch.as_tensor(H.trace(method="exact").value))
        assert torch.isfinite(H.hvp(torch.ones(2, H.dim))).all()


def test_attention_dropout_counts_as_dropout():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(6, 2, dropout=0.5, batch_first=True)
            self.head = nn.Linear(6, 4)

        def forward(self, x):
            h = x.unsqueeze(1)
            return self.head(self.att(h, h, h)[0].squeeze(1))

    with pytest.warns(UserWarning, match="dropout is active"):
        hl.Hessian(Attn().train(), cross_entropy, _data())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hl.Hessian(Attn().eval(), cross_entropy, _data())


def test_wrong_vector_size():
    H = hl.Hessian(mlp(), cross_entropy, _data())
    with pytest.raises(HesslensInputError, match="batch of vectors"):
        H.hvp(torch.ones(3))


def test_inputs_and_model_on_different_devices():
    model = mlp()
    data = [(x.to("meta"), y.to("meta")) for x, y in _data()]
    with pytest.raises(HesslensInputError, match="inputs are on meta but the model is on cpu"):
        hl.Hessian(model, cross_entropy, data)


def test_mismatched_batch():
    with pytest.raises(HesslensInputError, match="rows"):
        hl.Hessian(mlp(), cross_entropy, (torch.randn(3, 6), torch.zeros(4, dtype=torch.long)))


@pytest.mark.parametrize("estimate", [
    lambda H, s: H.trace(seed=s),
    lambda H, s: H.traces(seed=s),
    lambda H, s: H.trace(method="hutchinson", seed=s),
    lambda H, s: H.eigenvalues(k=2, seed=s),
    lambda H, s: H.density(seed=s, n_probes=2, n_steps=5),
], ids=["trace", "traces", "hutchinson", "eigenvalues", "density"])
@pytest.mark.parametrize("seed", [2**70, 2**32, -1])
def test_seed_outside_every_library_s_range(estimate, seed):
    H = hl.Hessian(mlp(), cross_entropy, _data())
    with pytest.raises(HesslensInputError, match=r"seed must be an integer in \[0, 4294967295\]"):
        estimate(H, seed)


@pytest.mark.parametrize("estimate", [
    lambda H: H.trace(),
    lambda H: H.traces(),
    lambda H: H.eigenvalues(k=2),
    lambda H: H.density(n_probes=2, n_steps=5),
], ids=["trace", "traces", "eigenvalues", "density"])
def test_loss_in_float32_subnormal_range(estimate):
    with pytest.raises(CurvatureUnderflowError, match=r"below the normal range of float32"):
        estimate(hl.Hessian(mlp(), lambda o, y: cross_entropy(o, y) * 1e-40, _data()))
    # the float64 copy has the same curvature inside its normal range: the right result
    H64 = hl.Hessian(mlp(), lambda o, y: cross_entropy(o, y) * 1e-40, _data(),
                     dtype=torch.float64)
    ref = hl.Hessian(mlp(), cross_entropy, _data(), dtype=torch.float64)
    assert H64.eigenvalues(k=1).values[0] == pytest.approx(
        1e-40 * float(ref.eigenvalues(k=1).values[0]), rel=1e-6)


@pytest.mark.parametrize("scale", [1e-40, 1e-45])
def test_a_subnormal_loss_is_refused_before_any_product(scale):
    """A loss below float32's normal range (1e-45: products exactly 0, which a zero operator
    also gives) is refused at construction, naming the fix."""
    with pytest.raises(CurvatureUnderflowError, match=r"loss .* below the normal range of "
                                                      r"float32.*dtype=torch.float64"):
        hl.Hessian(mlp(), lambda o, y: cross_entropy(o, y) * scale, _data())


def test_an_empty_batch_is_named():
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    with pytest.raises(HesslensInputError, match=r"batch 1 is empty \(0 samples\)"):
        hl.Hessian(mlp(), cross_entropy, [(x, y), (x[:0], y[:0])])


def test_a_batch_without_loss_terms_weighs_nothing():
    """A batch whose labels are all ignored (-100) has no loss terms: it is skipped, and the
    operator is that of the other batches."""
    torch.manual_seed(0)
    model = mlp().double()
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 4, (6,))
    ignored = torch.full((3,), -100)

    def loss_fn(out, target):
        return cross_entropy(out, target, ignore_index=-100)

    def count(batch):
        return int((batch[1] != -100).sum())

    both = hl.Hessian(model, loss_fn, [(x, y), (x[:3], ignored)], num_terms=count)
    alone = hl.Hessian(model, loss_fn, (x, y))
    v = torch.randn(both.dim, dtype=torch.float64)
    torch.testing.assert_close(both.hvp(v), alone.hvp(v), atol=1e-12, rtol=1e-10)
    assert both.num_samples == 6


class _DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return {"logits": self.net(x), "features": x}


def test_gauss_newton_gives_loss_fn_the_outputs_in_their_own_form():
    """A model returning {"logits": ...} with a loss_fn that indexes it works for the
    Gauss-Newton matrix as for the Hessian (loss_fn sees a mapping with the logits)."""
    model = _DictOut().double()
    data = [(x.double(), y) for x, y in _data()]

    def loss_fn(outputs, targets):
        return cross_entropy(outputs["logits"], targets)

    G = hl.GaussNewton(model, loss_fn, data)
    plain = hl.GaussNewton(model.net, cross_entropy, data)
    v = torch.randn(G.dim, dtype=torch.float64)
    torch.testing.assert_close(G.hvp(v), plain.hvp(v), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(G.hvp(v[None].repeat(2, 1)), plain.hvp(v[None].repeat(2, 1)),
                               atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(hl.EmpiricalFisher(model, loss_fn, data).hvp(v),
                               hl.EmpiricalFisher(model.net, cross_entropy, data).hvp(v),
                               atol=1e-12, rtol=1e-10)
    with pytest.raises(HesslensInputError, match="only 'logits'"):
        hl.GaussNewton(model, lambda o, y: cross_entropy(o["logits"], y) + o["features"].sum()
                       * 0, data).hvp(v)


def test_a_meta_device_model_is_named():
    with torch.device("meta"):
        model = mlp()
    with pytest.raises(HesslensInputError, match=r"meta device.*to_empty"):
        hl.Hessian(model, cross_entropy, _data())
