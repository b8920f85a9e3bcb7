"""Tests of the zoo's networks: shapes, weight-layer counts, determinism, torch.func use."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from hesslens.errors import HesslensInputError
from hesslens.zoo import (
    MODELS,
    VGG,
    CifarResNet,
    build_model,
    cnn1d,
    lenet5,
    mlp,
    resnet18,
    resnet20,
)

IMAGE_MODELS = ("lenet", "vgg11", "vgg11_bn", "resnet18", "resnet20")
IMAGE_CASES = (((1, 8, 8), 10), ((1, 28, 28), 10), ((3, 32, 32), 10), ((3, 32, 32), 100))
CASES = (
    [("mlp", (1, 40), 10), ("mlp", (40,), 10), ("cnn1d", (1, 40), 10), ("cnn1d", (40,), 10)]
    + [("mlp", shape, c) for shape, c in IMAGE_CASES]
    + [(name, shape, c) for name in IMAGE_MODELS for shape, c in IMAGE_CASES]
)
WEIGHT_LAYERS = {
    "mlp": 3,
    "mlp5": 6,
    "cnn1d": 3,
    "cnn1d3": 4,
    "lenet": 5,
    "vgg11": 11,
    "vgg11_bn": 11,
    "resnet18": 21,
    "resnet20": 22,
}
SMALLEST_SHAPE = {"mlp": (1, 40), "mlp5": (1, 40), "cnn1d": (1, 40), "cnn1d3": (1, 40)}


def built(name: str, shape: tuple[int, ...], num_classes: int = 10) -> nn.Module:
    """One shared seed-0 build per configuration: the big networks take a while to initialise."""
    return _built(name, tuple(shape), num_classes)


@functools.cache
def _built(name: str, shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return build_model(name, shape, num_classes, seed=0)


def weight_layers(model: nn.Module) -> list[nn.Module]:
    kinds = (nn.Conv1d, nn.Conv2d, nn.Linear)
    return [m for m in model.modules() if isinstance(m, kinds)]


@pytest.mark.parametrize(("name", "shape", "num_classes"), CASES)
def test_forward_shape_in_train_and_eval_mode(name, shape, num_classes):
    model = built(name, shape, num_classes)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    for mode in (True, False):
        out = model.train(mode)(x)
        assert out.shape == (2, num_classes)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_registry_names():
    assert sorted(MODELS) == sorted([*WEIGHT_LAYERS, "gpt-nano", "vit-tiny"])  # + HF models,
    # tested in test_zoo_transformers.py


@pytest.mark.parametrize("name", sorted(WEIGHT_LAYERS))
def test_weight_layer_count(name):
    model = built(name, SMALLEST_SHAPE.get(name, (3, 32, 32)))
    assert len(weight_layers(model)) == WEIGHT_LAYERS[name]


@pytest.mark.parametrize(
    ("builder", "n_conv", "n_shortcut"), [(resnet18, 20, 3), (resnet20, 21, 2)]
)
def test_resnet_convolutions_and_shortcuts(builder, n_conv, n_shortcut):
    model = built(builder.__name__, (3, 32, 32))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == n_conv
    assert sum(c.kernel_size == (1, 1) for c in convs) == n_shortcut
    assert all(c.bias is None for c in convs)
    assert [n for n, _ in model.named_children() if n.startswith("layer")] == [
        f"layer{i + 1}" for i in range(model.num_stages)
    ]


def test_resnet_stage_widths():
    assert [
        getattr(built("resnet20", (3, 32, 32)), f"layer{i}")[-1].conv2.out_channels
        for i in (1, 2, 3)
    ] == [16, 32, 64]
    assert [
        getattr(built("resnet18", (3, 32, 32)), f"layer{i}")[-1].conv2.out_channels
        for i in (1, 2, 3, 4)
    ] == [64, 128, 256, 512]
    assert len(built("resnet20", (3, 32, 32)).layer2) == 3
    assert len(built("resnet18", (3, 32, 32)).layer2) == 2


@pytest.mark.parametrize(
    ("shape", "in_features"), [((1, 8, 8), 64), ((1, 28, 28), 400), ((3, 32, 32), 400)]
)
def test_lenet_sizing(shape, in_features):
    model = lenet5(shape, 10)
    assert model.fc1.in_features == in_features
    assert [model.fc1.out_features, model.fc2.out_features] == [120, 84]


@pytest.mark.parametrize(("shape", "pools"), [((1, 8, 8), 3), ((1, 28, 28), 4), ((3, 32, 32), 5)])
def test_vgg_skips_pools_on_small_inputs(shape, pools):
    model = built("vgg11", shape)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == pools
    assert model.classifier[0].in_features == 512


def test_vgg11_bn_has_batchnorm_and_plain_has_none():
    plain, with_bn = built("vgg11", (3, 32, 32)), built("vgg11_bn", (3, 32, 32))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules()) == 8


@pytest.mark.parametrize("name", sorted(WEIGHT_LAYERS))
def test_no_dropout_and_deterministic_forward(name):
    shape = SMALLEST_SHAPE.get(name, (1, 8, 8))
    model = built(name, shape)
    assert not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", sorted(WEIGHT_LAYERS))
def test_same_seed_same_weights_other_seed_other_weights(name):
    shape = SMALLEST_SHAPE.get(name, (1, 8, 8))
    a, b = built(name, shape), build_model(name, shape, 10, seed=0)
    c = build_model(name, shape, 10, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_build_model_matches_manual_seed_and_keeps_global_state():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    model = build_model("lenet", (1, 8, 8), 10, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(7)
    manual = lenet5((1, 8, 8), 10)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), manual.parameters()))


def test_build_model_options():
    model = build_model("mlp", (1, 40), 10, hidden=(8,))
    assert [m.out_features for m in weight_layers(model)] == [8, 10]
    model = build_model("cnn1d", (1, 40), 10, channels=(4, 4, 4))
    assert len(weight_layers(model)) == 4
    assert len(weight_layers(mlp((1, 40), 10, hidden=()))) == 1  # logistic regression


def test_cnn1d_takes_flat_and_channel_batches():
    x = torch.randn(4, 40)
    for shape in ((40,), (1, 40)):
        model = cnn1d(shape, 10)
        assert model(x).shape == (4, 10)
        assert model(x.unsqueeze(1)).shape == (4, 10)
    with pytest.raises(HesslensInputError, match="cnn1d expects"):
        cnn1d((1, 40), 10)(torch.randn(4, 1, 1, 40))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: build_model("alexnet", (3, 32, 32), 10), "lenet, mlp, mlp5, resnet18"),
        (lambda: build_model("lenet", (1, 40), 10), r"lenet: input_shape must be 3-D"),
        (lambda: build_model("resnet18", (40,), 10), "resnet18: input_shape"),
        (lambda: build_model("cnn1d", (1, 8, 8), 10), "cnn1d: input_shape must be 1-D or 2-D"),
        (lambda: build_model("mlp", (1, 0), 10), "positive ints"),
        (lambda: build_model("mlp", 40, 10), "tuple of positive ints"),
        (lambda: build_model("vgg11", (3, 32, 32), 0), "num_classes"),
        (lambda: build_model("mlp", (40,), 10, hidden=(0,)), "hidden"),
        (lambda: build_model("lenet", (1, 8, 8), 10, hidden=(8,)), "does not take the option"),
        (lambda: build_model("lenet", (1, 8, 8), 10, seed=1.5), "seed"),
    ],
)
def test_bad_input_raises_input_error(call, match):
    with pytest.raises(HesslensInputError, match=match):
        call()


@functools.lru_cache(maxsize=1)
def _hvp_models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Every zoo architecture; VGG and ResNet at reduced width (same classes, same code paths)."""
    return {
        "mlp": (build_model("mlp", (1, 40), 10), (1, 40)),
        "cnn1d": (build_model("cnn1d", (1, 40), 10), (1, 40)),
        "lenet": (build_model("lenet", (1, 8, 8), 10), (1, 8, 8)),
        "vgg_bn_small": (VGG((1, 8, 8), 10, (8, "M", 16, "M", 16), batch_norm=True), (1, 8, 8)),
        "resnet_small": (
            CifarResNet((1, 8, 8), 10, widths=(4, 8, 8, 16), blocks=(1,) * 4),
            (1, 8, 8),
        ),
    }


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", ["mlp", "cnn1d", "lenet", "vgg_bn_small", "resnet_small"])
def test_torch_func_hvp_matches_double_backward(name):
    """The curvature engine's forward-over-reverse product must work on every zoo architecture."""
    torch.manual_seed(0)
    model, shape = _hvp_models()[name]
    model.eval()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, *shape, generator=gen), torch.arange(4)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        return nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    vs = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(2)]
    stacked = {k: torch.stack([v[k] for v in vs]) for k in params}
    hvps = vmap(lambda v: jvp(grad(loss), (params,), (v,))[1])(stacked)

    ps = [p.detach().requires_grad_() for p in params.values()]
    g = torch.autograd.grad(loss(dict(zip(params, ps))), ps, create_graph=True)
    for i, v in enumerate(vs):
        ref = torch.autograd.grad(g, ps, grad_outputs=list(v.values()), retain_graph=True)
        for k, r in zip(params, ref):
            torch.testing.assert_close(hvps[k][i], r, rtol=1e-4, atol=1e-5)
