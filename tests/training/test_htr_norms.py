"""The penalty's gradient through normalisation layers whose fused kernels get third derivatives
wrong (BatchNorm with batch statistics, InstanceNorm, LayerNorm), against hand-written ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hesslens.errors import HesslensInputError
from hesslens.training.norms import DecomposedNorms, fused_norms_in_graph
from hesslens.training.penalty import HessianTracePenalty
from hesslens.training.penalty_forms import HessianForm

CE = nn.functional.cross_entropy


class _Net(nn.Module):
    """Linear -> norm -> tanh -> Linear; ``manual=True`` writes the norm out in primitives."""

    def __init__(self, kind: str, manual: bool):
        super().__init__()
        torch.manual_seed(0)
        self.kind, self.manual = kind, manual
        self.inp = nn.Linear(3, 4)
        self.norm = {"batch": nn.BatchNorm1d(4), "instance": nn.InstanceNorm1d(4, affine=True),
                     "layer": nn.LayerNorm(4)}[kind]
        self.out = nn.Linear(4 if kind != "instance" else 8, 2)
        with torch.no_grad():  # non-trivial affine parameters
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        h = self.inp(x)
        if self.kind == "instance":
            h = torch.stack([h, h.flip(1) * 0.5 + 0.1], dim=2)  # (N, C=4, L=2)
        if not self.manual:
            h = self.norm(h)
        else:
            w, b, eps = self.norm.weight, self.norm.bias, self.norm.eps
            if self.kind == "batch":
                dims, shape = (0,), (1, -1)
            elif self.kind == "instance":
                dims, shape = (2,), (1, -1, 1)
            else:
                dims, shape = (-1,), (1, -1)
            mean = h.mean(dims, keepdim=True)
            var = ((h - mean) ** 2).mean(dims, keepdim=True)
            h = (h - mean) / torch.sqrt(var + eps) * w.reshape(shape) + b.reshape(shape)
        return self.out(torch.tanh(h).flatten(1))


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 2, (10,), generator=g)


def _penalty_grads(model, x, y, probes, layers):
    pen = HessianTracePenalty(model, layers=layers, seed=0, loss_fn=CE)
    model.zero_grad()
    value = pen(CE(model(x), y), inputs=x, targets=y, probes=probes)
    value.backward()
    return float(value.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("layers", ["all", ["norm", "out"]], ids=str)
@pytest.mark.parametrize("kind", ["batch", "instance", "layer"])
def test_penalty_gradient_through_norm_layers_is_exact(kind, layers):
    fused, manual = _Net(kind, False).double(), _Net(kind, True).double()
    manual.load_state_dict(fused.state_dict())
    x, y = _data()
    assert fused_norms_in_graph(CE(fused(x), y))  # the case this guards against
    assert not fused_norms_in_graph(CE(manual(x), y))
    probes = HessianTracePenalty(fused, layers=layers, seed=3).sample_probes(2)
    v_fused, g_fused = _penalty_grads(fused, x, y, probes, layers)
    v_manual, g_manual = _penalty_grads(manual, x, y, probes, layers)
    assert v_fused == pytest.approx(v_manual, rel=1e-10)
    for name in g_manual:
        torch.testing.assert_close(g_fused[name], g_manual[name], rtol=1e-9, atol=1e-11,
                                   msg=name)
    if kind == "batch":
        # BatchNorm removes the bias of the layer before it: its gradient is exactly zero.
        assert g_fused["inp.bias"].abs().max() < 1e-10


def test_fused_kernels_would_have_been_wrong():
    """Guard for the guard: without the re-evaluation the gradient is off by O(1)."""
    fused, manual = _Net("batch", False).double(), _Net("batch", True).double()
    manual.load_state_dict(fused.state_dict())
    x, y = _data()
    probes = HessianTracePenalty(fused, seed=3).sample_probes(1)
    pen = HessianTracePenalty(fused, seed=0)
    fused.zero_grad()
    try:
        HessianForm()(CE(fused(x), y), pen.parameters(), probes).backward()
    except RuntimeError:  # later PyTorch versions refuse instead of answering wrongly
        return
    _, g_manual = _penalty_grads(manual, x, y, probes, "all")
    assert (fused.inp.weight.grad - g_manual["inp.weight"]).abs().max() > 1e-3


def test_penalty_without_the_batch_names_the_problem():
    model = _Net("batch", False).double()
    x, y = _data()
    pen = HessianTracePenalty(model, seed=0, loss_fn=CE)
    with pytest.raises(HesslensInputError, match=r"third derivatives.*inputs=x"):
        pen(CE(model(x), y))
    model.eval()  # running statistics: an affine map, nothing to re-evaluate
    assert not fused_norms_in_graph(CE(model(x), y))
    assert torch.isfinite(pen(CE(model(x), y)))


def test_re_evaluation_leaves_running_statistics_and_rng_alone():
    model = _Net("batch", False).double()
    x, y = _data()
    pen = HessianTracePenalty(model, seed=0, loss_fn=CE)
    loss = CE(model(x), y)
    stats = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    pen(loss, inputs=x, targets=y)
    for n, b in model.named_buffers():
        assert torch.equal(b, stats[n]), n
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("module", [nn.BatchNorm1d(4), nn.InstanceNorm1d(4, affine=True),
                                    nn.LayerNorm(5), nn.BatchNorm2d(4)], ids=repr)
def test_decomposed_norms_compute_the_same_function(module):
    torch.manual_seed(0)
    shape = {nn.BatchNorm2d: (6, 4, 3, 5)}.get(type(module), (6, 4, 5))
    x = torch.randn(*shape, dtype=torch.float64)
    fused, dec = module.double(), __import__("copy").deepcopy(module).double()
    with torch.no_grad():
        for p in [*fused.parameters()]:
            p.uniform_(0.5, 1.5)
        dec.load_state_dict(fused.state_dict())
    a = fused(x)
    with DecomposedNorms():
        b = dec(x)
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for (n, s), (_, t) in zip(fused.named_buffers(), dec.named_buffers()):
        torch.testing.assert_close(t, s, rtol=1e-10, atol=1e-12, msg=n)
