"""What each zoo model takes: its batches (:func:`model_batches`) and its loss (:func:`model_loss`).

The classic zoo networks take ``(inputs, targets)`` pairs and the cross-entropy of their logits.
The Hugging Face models take mappings and compute their own loss from ``labels`` (``loss_fn=None``
for the curvature operators): ``{"input_ids", "labels"}`` for ``gpt-nano`` (labels ``-100``
except the predicted tokens; the operators weight each batch by its label tokens) and
``{"pixel_values", "labels"}`` for ``vit-tiny`` (signals ``(N, C, L)`` become images
``(N, C, 1, L)``). Both functions take a zoo model name or the model itself (any Hugging Face
model: its ``main_input_name`` decides).

Example:
    >>> import hesslens.zoo as zoo
    >>> ds = zoo.load_dataset("modadd")
    >>> x, y = zoo.token_subset(*ds.train, per_class=2, seed=0)
    >>> data = zoo.model_batches("gpt-nano", x, y, batch_size=32)
    >>> sorted(data[0]), [len(b["input_ids"]) for b in data], zoo.model_loss("gpt-nano")
    (['input_ids', 'labels'], [32, 14], None)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hesslens.checks import check_xy
from hesslens.errors import HesslensInputError
from hesslens.zoo._checks import check_positive_int
from hesslens.zoo.dataset import batches
from hesslens.zoo.models import MODELS
from hesslens.zoo.tasks import check_token_labels

# zoo name -> the keyword its forward takes the inputs as (the Hugging Face ``main_input_name``)
HF_INPUTS = {"gpt-nano": "input_ids", "vit-tiny": "pixel_values"}

Batch = dict[str, torch.Tensor] | tuple[torch.Tensor, torch.Tensor]


def model_input(model: str | nn.Module) -> str | None:
    """The keyword a Hugging Face model takes its inputs as, or ``None`` for a model called as
    ``model(inputs)`` on ``(inputs, targets)`` pairs.

    >>> model_input("gpt-nano"), model_input("lenet")
    ('input_ids', None)
    """
    if isinstance(model, str):
        if model not in MODELS:
            raise HesslensInputError(
                f"unknown model {model!r}; choose one of: {', '.join(sorted(MODELS))}"
            )
        return HF_INPUTS.get(model)
    if not isinstance(model, nn.Module):
        raise HesslensInputError(
            f"model must be a zoo model name or a torch.nn.Module, got {type(model).__name__}"
        )
    name = getattr(type(model), "main_input_name", None)
    return name if isinstance(name, str) and hasattr(model, "config") else None


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def model_loss(model: str | nn.Module) -> LossFn | None:
    """The ``loss_fn`` to give the curvature operators with :func:`model_batches`' data:
    ``None`` for a Hugging Face model (its own loss, from ``labels``), else the cross-entropy
    (batch mean).

    >>> model_loss("vit-tiny") is None, model_loss("mlp").__name__
    (True, 'cross_entropy')
    """
    return None if model_input(model) is not None else nn.functional.cross_entropy


def _slices(n: int, batch_size: int | None) -> list[slice]:
    size = n if batch_size is None else check_positive_int(batch_size, "batch_size")
    return [slice(start, start + size) for start in range(0, n, max(size, 1))]


def _config(model: str | nn.Module, key: str) -> object:
    return None if isinstance(model, str) else getattr(model.config, key, None)


def model_batches(
    model: str | nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None
) -> list[Batch]:
    """Cut ``(x, y)`` into the batches ``model`` takes, in order (the last one may be smaller).

    Args:
        model: a zoo model name (:data:`~hesslens.zoo.models.MODELS`) or a model.
        x, y: a data set's inputs and labels, e.g. ``Dataset.train`` or an analysis subset:
            token ids and labels ``(N, T)`` for ``gpt-nano``; images ``(N, C, H, W)`` or signals
            ``(N, C, L)`` and class labels ``(N,)`` for the others.
        batch_size: examples per batch; ``None``: one batch of everything.

    Returns:
        A list (it can be iterated again, as the operators do): ``{"input_ids": x, "labels": y}``
        for a language model, ``{"pixel_values": x, "labels": y}`` for an image model from
        Hugging Face, ``(x, y)`` pairs for the other zoo models.

    Raises:
        HesslensInputError: labels of the wrong kind for the model (token labels for a
            classifier or the reverse), sequences longer than the model's positions, or a bad
            ``batch_size``.

    >>> x, y = torch.randn(5, 1, 8, 8), torch.arange(5)
    >>> [tuple(b["pixel_values"].shape) for b in model_batches("vit-tiny", x, y, 4)]
    [(4, 1, 8, 8), (1, 1, 8, 8)]
    >>> [len(b[1]) for b in model_batches("lenet", x, y, 4)]
    [4, 1]
    """
    key = model_input(model)
    if key == "input_ids":
        vocab = _config(model, "vocab_size")
        if vocab is None:
            vocab = max(int(x.max()), int(y.max())) + 1 if _tensors(x, y) else 1
        check_token_labels(x, y, int(vocab), "model_batches")
        positions = _config(model, "n_positions") or _config(model, "max_position_embeddings")
        if isinstance(positions, int) and x.shape[1] > positions:
            raise HesslensInputError(
                f"model_batches: sequences of {x.shape[1]} tokens, but the model has "
                f"{positions} positions; build it with input_shape=({x.shape[1]},)"
            )
        return [{key: x[s], "labels": y[s]} for s in _slices(len(x), batch_size)]
    if isinstance(y, torch.Tensor) and y.dim() == 2:
        raise HesslensInputError(
            f"model_batches: labels of shape {tuple(y.shape)} are a token task's; they need a "
            "language model such as 'gpt-nano'"
        )
    check_xy(x, y, "model_batches")
    if key is None:
        return list(batches(x, y, batch_size=len(y) if batch_size is None else batch_size))
    if key == "pixel_values" and x.dim() == 3:
        x = x.unsqueeze(2)  # signals (N, C, L) are images of height 1
    return [{key: x[s], "labels": y[s]} for s in _slices(len(x), batch_size)]


def _tensors(x: object, y: object) -> bool:
    return (
        isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.numel() > 0
        and y.numel() > 0
    )
