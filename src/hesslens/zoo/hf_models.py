"""Two small Hugging Face transformers, built from a config (never downloaded): ``gpt-nano``,
a ``GPT2LMHeadModel`` for the token tasks of :mod:`hesslens.zoo.tasks`, and ``vit-tiny``, a
``ViTForImageClassification`` for the 8x8 ``digits`` or MNIST-1D.

``transformers`` is imported only when one of them is built (``pip install "hesslens[hf]"``).
Both are built with every dropout probability 0, so they may stay in train mode (the curvature
operators refuse dropout only when it is active) and their forward is deterministic. Attention
is the library's default (``sdpa``). Both compute their own loss from ``labels``, a batch mean
(the language model's over the label tokens that are not ``-100``, in the model's dtype); see
:func:`hesslens.zoo.inputs.model_batches` for the batches they take.

Example:
    >>> import torch
    >>> from hesslens.zoo.hf_models import gpt_nano
    >>> model = gpt_nano((4,), 24)
    >>> model(input_ids=torch.zeros(2, 4, dtype=torch.long)).logits.shape
    torch.Size([2, 4, 24])
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import nn

from hesslens.errors import HesslensInputError
from hesslens.zoo._checks import check_input_shape, check_positive_int
from hesslens.zoo.tasks import IGNORE_INDEX


def import_transformers(what: str) -> ModuleType:
    """Import ``transformers``, or raise a :class:`HesslensInputError` that says how to install it.

    >>> import_transformers("gpt-nano").__name__
    'transformers'
    """
    try:
        import transformers
    except ImportError as err:
        raise HesslensInputError(
            f"{what} is built with Hugging Face transformers, which is not installed: "
            'pip install "hesslens[hf]" (or pip install transformers)'
        ) from err
    return transformers


def _heads(width: int, heads: int, what: str) -> None:
    if width % heads:
        raise HesslensInputError(
            f"{what}: the width {width} is not divisible by the {heads} attention heads; "
            "choose a width that is a multiple of the number of heads"
        )


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: torch.Tensor | None = None,
    **kwargs: object,
) -> torch.Tensor:
    """Hugging Face's causal language-model loss (``ForCausalLMLoss``: labels shifted by one,
    mean cross-entropy over the tokens whose label is not ``ignore_index``, or their sum over
    ``num_items_in_batch``), computed in the logits' own dtype.

    Hugging Face casts the logits to float32, so a float64 model's loss (and every curvature
    product of it) would be only float32-accurate; here float32 and float64 stay as they are
    and only half precision is raised to float32. gpt-nano uses it as its ``loss_function``.

    >>> logits, labels = torch.zeros(1, 3, 5, dtype=torch.float64), torch.tensor([[-100, 1, 2]])
    >>> loss = causal_lm_loss(logits, labels, vocab_size=5)
    >>> loss.dtype, round(float(loss), 6) == round(float(torch.log(torch.tensor(5.0))), 6)
    (torch.float64, True)
    """
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, vocab_size), shift_labels.reshape(-1).to(logits.device),
        ignore_index=ignore_index, reduction=reduction,
    )
    if num_items_in_batch is not None:
        loss = loss / (num_items_in_batch.to(loss.device)
                       if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
    return loss


def masked_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    **kwargs: object,
) -> torch.Tensor:
    """Hugging Face's masked language-model loss (``ForMaskedLMLoss``: labels not shifted, mean
    cross-entropy over the tokens whose label is not ``ignore_index``), in the logits' own
    dtype as :func:`causal_lm_loss` (which it is, with the labels in place).

    >>> rng = torch.Generator().manual_seed(0)
    >>> logits = torch.randn(1, 3, 5, dtype=torch.float64, generator=rng)
    >>> labels = torch.tensor([[-100, 1, 2]])
    >>> loss = masked_lm_loss(logits, labels, 5)
    >>> loss.dtype, bool(loss == nn.functional.cross_entropy(logits[0, 1:], labels[0, 1:]))
    (torch.float64, True)
    """
    return causal_lm_loss(logits, labels, vocab_size, num_items_in_batch, ignore_index,
                          shift_labels=labels)


def gpt_nano(
    input_shape: Sequence[int],
    num_classes: int,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 2,
) -> nn.Module:
    """A GPT-2 language model (``GPT2LMHeadModel``) sized for the zoo's token tasks.

    Args:
        input_shape: ``(T,)``, the sequence length; it becomes ``n_positions``.
        num_classes: the vocabulary size (``vocab_size``; the number of output logits).
        n_layer, n_embd, n_head: depth, width and attention heads (``n_embd % n_head == 0``);
            the MLP is ``4 * n_embd`` wide with the exact GELU, the output layer is tied to the
            token embedding as in GPT-2. The defaults give 26,368 parameters for ``"modadd"``
            (vocabulary 24).

    Dropout (embedding, attention, residual) is 0 and ``use_cache`` is off. Its own loss is
    :func:`causal_lm_loss` (Hugging Face's, kept in float64 when the model is).

    >>> model = gpt_nano((4,), 24)
    >>> sum(p.numel() for p in model.parameters()), model.config.n_positions
    (26368, 4)
    """
    (seq_len,) = check_input_shape(input_shape, "gpt-nano", ndims=(1,))
    vocab = check_positive_int(num_classes, "num_classes")
    n_layer = check_positive_int(n_layer, "n_layer")
    n_embd = check_positive_int(n_embd, "n_embd")
    n_head = check_positive_int(n_head, "n_head")
    _heads(n_embd, n_head, "gpt-nano")
    tf = import_transformers("gpt-nano")
    config = tf.GPT2Config(
        vocab_size=vocab, n_positions=seq_len, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        activation_function="gelu",  # exact GELU, one op; GPT-2's tanh form is five (slower)
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
        bos_token_id=None, eos_token_id=None,
    )
    model = tf.GPT2LMHeadModel(config)
    model.loss_function = causal_lm_loss
    return model


def _patch(patch_size: object, image: tuple[int, int]) -> tuple[int, int]:
    if patch_size is None:
        patch = (2, 2) if image[0] > 1 else (1, 4)
    elif isinstance(patch_size, numbers.Integral) and not isinstance(patch_size, bool):
        patch = (min(int(patch_size), image[0]), int(patch_size))
    elif isinstance(patch_size, Sequence) and len(patch_size) == 2:
        patch = (check_positive_int(patch_size[0], "patch_size"),
                 check_positive_int(patch_size[1], "patch_size"))
    else:
        raise HesslensInputError(
            f"vit-tiny: patch_size must be an int or (h, w), got {patch_size!r}"
        )
    if patch[0] < 1 or patch[1] < 1 or image[0] % patch[0] or image[1] % patch[1]:
        raise HesslensInputError(
            f"vit-tiny: patches of {patch} do not tile images of {image}; choose a patch size "
            "that divides the height and width"
        )
    return patch


def vit_tiny(
    input_shape: Sequence[int],
    num_classes: int,
    patch_size: int | tuple[int, int] | None = None,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
) -> nn.Module:
    """A Vision Transformer classifier (``ViTForImageClassification``) for small inputs.

    Args:
        input_shape: ``(C, H, W)`` images, or ``(C, L)`` signals (MNIST-1D), taken as images of
            height 1 (:func:`~hesslens.zoo.inputs.model_batches` adds that axis).
        num_classes: ``num_labels``.
        patch_size: an int (capped at the height), or ``(h, w)``; default 2x2 for images
            (digits: 16 patches) and 1x4 for signals (MNIST-1D: 10 patches).
        hidden_size, num_hidden_layers, num_attention_heads: width, depth and heads; the MLP
            is ``2 * hidden_size`` wide.

    Dropout is 0; ``problem_type`` is single-label classification (cross-entropy, batch mean).

    >>> model = vit_tiny((1, 8, 8), 10)
    >>> sum(p.numel() for p in model.parameters()), model.config.patch_size
    (18218, (2, 2))
    """
    shape = check_input_shape(input_shape, "vit-tiny", ndims=(2, 3))
    channels, image = shape[0], ((1, shape[1]) if len(shape) == 2 else (shape[1], shape[2]))
    labels = check_positive_int(num_classes, "num_classes")
    hidden = check_positive_int(hidden_size, "hidden_size")
    layers = check_positive_int(num_hidden_layers, "num_hidden_layers")
    heads = check_positive_int(num_attention_heads, "num_attention_heads")
    _heads(hidden, heads, "vit-tiny")
    patch = _patch(patch_size, image)
    tf = import_transformers("vit-tiny")
    config = tf.ViTConfig(
        image_size=image, patch_size=patch, num_channels=channels, hidden_size=hidden,
        num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=labels,
        problem_type="single_label_classification",
    )
    return tf.ViTForImageClassification(config)
