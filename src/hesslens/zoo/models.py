"""The model registry: every zoo network by name, and a seeded builder.

Every builder has the signature ``builder(input_shape, num_classes, **options)`` where
``input_shape`` is one example's shape without the batch dimension. The networks have no dropout
and no other randomness in ``forward``; their weights depend only on the torch random state when
they are built (``build_model(..., seed=s)`` fixes it without touching the global state).

Example:
    >>> from hesslens.zoo.models import build_model, MODELS
    >>> sorted(MODELS)[:6]
    ['cnn1d', 'cnn1d3', 'gpt-nano', 'lenet', 'mlp', 'mlp5']
    >>> model = build_model("lenet", (1, 8, 8), num_classes=10, seed=0)
    >>> type(model).__name__
    'LeNet5'
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

from hesslens.checks import check_seed
from hesslens.errors import HesslensInputError
from hesslens.zoo.cnn1d import cnn1d, cnn1d3
from hesslens.zoo.hf_models import gpt_nano, vit_tiny
from hesslens.zoo.lenet import lenet5
from hesslens.zoo.mlp import mlp, mlp5
from hesslens.zoo.resnet import resnet18, resnet20
from hesslens.zoo.vgg import vgg11, vgg11_bn

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "mlp5": mlp5,
    "cnn1d": cnn1d,
    "cnn1d3": cnn1d3,  # the MNIST-1D paper's CNN (three convolutions of 25 channels)
    "lenet": lenet5,
    "vgg11": vgg11,
    "vgg11_bn": vgg11_bn,
    "resnet18": resnet18,
    "resnet20": resnet20,
    "gpt-nano": gpt_nano,  # Hugging Face (transformers imported only when built); input_shape
    "vit-tiny": vit_tiny,  # (T,) and num_classes = vocabulary for gpt-nano; see zoo.inputs
}


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    seed: int = 0,
    **options: object,
) -> nn.Module:
    """Build the zoo model ``name`` with weights drawn from ``torch.manual_seed(seed)``.

    The global torch random state is left as it was. ``options`` go to the builder (e.g.
    ``hidden=(128,)`` for ``"mlp"``, ``channels=(32, 32)`` for ``"cnn1d"``).

    Raises:
        HesslensInputError: unknown ``name`` (the message lists the known names), a bad
            ``input_shape``/``num_classes``, or an option the builder does not take.

    >>> a = build_model("mlp", (1, 40), 10, seed=3)
    >>> b = build_model("mlp", (1, 40), 10, seed=3)
    >>> all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    True
    """
    if name not in MODELS:
        raise HesslensInputError(
            f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}"
        )
    seed = check_seed(seed)
    builder = MODELS[name]
    accepted = set(inspect.signature(builder).parameters) - {"input_shape", "num_classes"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise HesslensInputError(
            f"model {name!r} does not take the option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(accepted)) or 'no options'}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(input_shape, num_classes, **options)
