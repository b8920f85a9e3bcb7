"""Which layers a training-time penalty looks at: ``"all"``, ``"middle"`` or a list of names.

A *layer* is a module that owns trainable parameters directly (a ``Linear``'s weight and bias
together, a ``BatchNorm``'s affine weight and bias together), named as in
``model.named_modules()``. Layers are listed in forward order; hesslens takes the order in which
the modules were registered, which is the forward order of every model of the zoo and of any
``nn.Sequential``. Discovery and selection are the curvature operators' own
(:mod:`hesslens.curvature.layers`), so the penalty and the Hessian operator agree on names and
on what ``"middle"`` means.

The middle layers
-----------------
``"middle"`` is :func:`hesslens.curvature.layers.middle_indices`: the layers with index
``round(n/4) .. round(3n/4)`` (half-up, end excluded) of the ``n`` layers in forward order, and
at least one. n = 3 gives layer 1 alone (an MNIST-1D MLP or CNN), n = 5 layers 1-3 (LeNet-5, as
the paper's tensor-index rule gives), n = 11 layers 3-7 (VGG11).

The paper's code (Sankar et al. 2021, repository yashkhasbage25/HTR) counted *parameter tensors*
instead of layers: with ``N`` tensors in ``named_parameters`` order (each weight and each bias a
tensor of its own) it kept the tensors with index ``floor(N / 4) .. floor(3 N / 4)``. That range
may cut a layer in two (keep its weight, drop its bias); counting whole layers keeps each
layer's weight and bias together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from hesslens.curvature.blocks import PRESETS, Blocks, ParamSlice, resolve_blocks
from hesslens.curvature.layers import discover_layers, middle_indices
from hesslens.curvature.layers import select_layers as choose
from hesslens.errors import HesslensInputError

__all__ = ["discover_layers", "middle_indices", "select_blocks", "select_layers"]


def select_blocks(
    model: nn.Module,
    layers: str | Sequence[str] | Mapping[str, Any] = "all",
    grouping: str | Mapping[str, Any] | None = None,
) -> Blocks:
    """The pieces a penalty looks at, as {block: [ParamSlice]}: ``layers`` selects blocks of
    ``grouping`` (default: one block per module, as :func:`select_layers`; or a preset such as
    ``"transformer"``, or a mapping of glob patterns / ParamSlices, as the curvature operators
    take ``layers=``). ``layers`` may itself be a preset or a mapping: all of its blocks.

    Example:
        >>> model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 2)
        >>> blocks = select_blocks(model, ["layers.1.attn.q"], grouping="transformer")
        >>> [str(p) for p in blocks["layers.1.attn.q"]]
        ['layers.1.self_attn.in_proj_weight[0:8]', 'layers.1.self_attn.in_proj_bias[0:8]']
    """
    if isinstance(layers, Mapping) or (isinstance(layers, str) and layers in PRESETS
                                       and layers != "modules"):
        grouping, layers = layers, "all"
    if grouping is None or grouping == "modules":
        return {name: [ParamSlice(p) for p in params]
                for name, params in select_layers(model, layers).items()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    blocks = resolve_blocks(model, grouping, trainable)
    shown = f"{list(blocks)[:12]}{' ...' if len(blocks) > 12 else ''}"
    return {name: blocks[name] for name in choose(
        blocks, layers, what="block", valid=f"the blocks of this grouping are {shown}")}


def select_layers(model: nn.Module, layers: str | Sequence[str] = "all") -> dict[str, list[str]]:
    """Resolve ``"all"``, ``"middle"`` or a list of layer names to {layer: parameter names}.

    Raises:
        HesslensInputError: unknown layer name (the message lists the valid ones), an empty
            selection, or a model without trainable parameters.
    """
    found = discover_layers(model)
    if not found:
        raise HesslensInputError(
            "the model has no trainable parameters; a Hessian-trace penalty needs some "
            "(check requires_grad on the model's parameters)"
        )
    return {name: found[name] for name in choose(
        found, layers, valid=f"valid layer names (modules owning trainable parameters, forward "
                             f"order) are {list(found)}")}
