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
    H = hl.Hessian(mlp(), lambda o, y: cross_entropy(o, y) * 1e-40, _data())
    with pytest.raises(CurvatureUnderflowError, match=r"below the normal range of float32"):
        estimate(H)
    # the float64 copy has the same curvature inside its normal range: the right result
    H64 = hl.Hessian(mlp(), lambda o, y: cross_entropy(o, y) * 1e-40, _data(),
                     dtype=torch.float64)
    ref = hl.Hessian(mlp(), cross_entropy, _data(), dtype=torch.float64)
    assert H64.eigenvalues(k=1).values[0] == pytest.approx(
        1e-40 * float(ref.eigenvalues(k=1).values[0]), rel=1e-6)
