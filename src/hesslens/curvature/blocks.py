"""Blocks beyond modules: which pieces of which parameters make up each curvature block.

A *block* is a list of :class:`~hesslens.curvature.pieces.ParamSlice` pieces: whole parameters,
or contiguous ranges along one dimension of a parameter, so that the query, key and value thirds
of a fused attention weight (GPT-2's ``c_attn``, PyTorch's ``in_proj_weight``) are blocks of
their own. :func:`resolve_blocks` builds them from a name (``"modules"``, or ``"transformer"``
and ``"transformer_heads"``, whose table of layouts is :mod:`hesslens.curvature.layouts`) or from
a mapping {block name: spec}, and checks them.

Index convention (pinned by ``tests/curvature/test_blocks.py`` against ``torch.func.hessian``):
the flat parameter vector concatenates the trainable parameters in ``model.named_parameters()``
order, each flattened row-major; a piece's elements are ``param.reshape(-1)[piece.flat_indices
(param.shape)]``, in ascending order, the same elements as ``piece.take(param).reshape(-1)``;
a block's vector concatenates its pieces in list order (:func:`block_flat_indices`).

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> names = [n for n, _ in model.named_parameters()]
    >>> blocks = resolve_blocks(model, {"first": "0.*", "rows": ParamSlice("2.weight", 0, 0, 1)},
    ...                         names)
    >>> [str(piece) for piece in blocks["rows"]]
    ['2.weight[0:1]']
    >>> block_flat_indices(blocks["rows"], {n: p.shape for n, p in model.named_parameters()})
    tensor([16, 17, 18, 19])
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from hesslens.curvature.layers import forward_sorted, module_call_ranks, owned_parameters
from hesslens.curvature.layouts import transformer_blocks
from hesslens.curvature.pieces import Blocks, ModelParameters, ParamSlice, name_list
from hesslens.errors import HesslensInputError

__all__ = [
    "PRESETS",
    "Blocks",
    "ParamSlice",
    "block_flat_indices",
    "block_numel",
    "block_parameters",
    "gather_block",
    "resolve_blocks",
    "scatter_block",
]

PRESETS = ("modules", "transformer", "transformer_heads")


def resolve_blocks(
    model: nn.Module,
    layers: str | Mapping[str, object] | None,
    trainable: Sequence[str],
    example_inputs: object = None,
) -> Blocks:
    """Resolve a block specification into {block name: [ParamSlice, ...]}, checked.

    ``layers``:

    - ``None`` or ``"modules"``: one block per module owning trainable parameters directly,
      whole parameters (the layers of :func:`hesslens.curvature.layers.discover_layers`);
    - ``"transformer"``: per transformer layer ``<layer>.attn.q``, ``.attn.k``, ``.attn.v``,
      ``.attn.o``, ``<layer>.mlp_in``, ``.mlp_out`` (``.mlp_gate`` for gated MLPs), where
      ``<layer>`` is the layer module's path (GPT-2: ``transformer.h.0``); a fused QKV weight
      and its bias are sliced; every other trainable parameter (embeddings, norms, the head)
      is a block named by the module that owns it, so the blocks cover every trainable
      parameter once. The attentions and MLPs are found by the table of
      :mod:`hesslens.curvature.layouts` (GPT-2's fused Conv1D, separate q/k/v as in BERT, ViT,
      Llama, T5 and DistilBERT, GPT-NeoX/BLOOM's per-head ``query_key_value``, fused Linear
      ``qkv``, ``nn.MultiheadAttention``, ...), which
      :func:`~hesslens.curvature.layouts.register_layout` extends. A second attention in one
      layer (cross-attention) is named by its path, e.g. ``layers.0.multihead_attn.q``;
    - ``"transformer_heads"``: the same with q, k, v split per attention head
      (``<layer>.attn.q.head0``, ...) and the output projection's input dimension split per head
      (``<layer>.attn.o.head0``, ...; its bias is ``<layer>.attn.o.bias``);
    - a mapping {block name: spec}: spec is an exact parameter name, a glob pattern over
      parameter names (:mod:`fnmatch`; a pattern also matches a name's dotted suffix, so
      ``"h.*.attn.*"`` matches ``"transformer.h.0.attn.c_attn.weight"``), a
      :class:`ParamSlice`, or a list of these. Mappings need not cover every parameter.

    ``trainable`` names the parameters that may appear (as in ``model.named_parameters()``);
    blocks come in forward order when ``example_inputs`` is given (one forward pass of a copy,
    as in ``discover_layers``), otherwise in parameter order. Overlapping pieces, names that are
    not trainable, patterns that match nothing, empty blocks and slices out of range are
    :class:`HesslensInputError`.

    Example:
        >>> from torch import nn
        >>> model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1)
        >>> names = [n for n, p in model.named_parameters()]
        >>> blocks = resolve_blocks(model, "transformer", names)
        >>> list(blocks)  # doctest: +NORMALIZE_WHITESPACE
        ['layers.0.attn.q', 'layers.0.attn.k', 'layers.0.attn.v', 'layers.0.attn.o',
         'layers.0.mlp_in', 'layers.0.mlp_out', 'layers.0.norm1', 'layers.0.norm2']
        >>> [str(piece) for piece in blocks["layers.0.attn.k"]]
        ['layers.0.self_attn.in_proj_weight[8:16]', 'layers.0.self_attn.in_proj_bias[8:16]']
    """
    universe = ModelParameters(model, trainable)
    if layers is None or (isinstance(layers, str) and layers == "modules"):
        owned = owned_parameters(model, lambda name, _param: name in universe.trainable)
        owned = forward_sorted(model, owned, example_inputs)
        blocks = {name: [ParamSlice(p) for p in params] for name, params in owned.items()}
        if not blocks:
            raise HesslensInputError(
                "the model has no trainable parameters to make blocks of (check requires_grad)")
        return blocks
    if isinstance(layers, str):
        if layers not in PRESETS:
            raise HesslensInputError(
                f"unknown block preset {layers!r}: use one of {list(PRESETS)}, or a mapping "
                "{block name: parameter names, glob patterns or ParamSlices}"
            )
        blocks = transformer_blocks(model, universe, heads=layers == "transformer_heads")
    elif isinstance(layers, Mapping):
        blocks = _mapping_blocks(layers, universe)
    else:
        raise HesslensInputError(
            f"layers must be None, one of {list(PRESETS)}, or a mapping {{block name: spec}}, "
            f"not {type(layers).__name__}"
        )
    _check_disjoint(blocks, universe)
    return _sorted_blocks(model, blocks, universe, example_inputs)


def block_parameters(blocks: Mapping[str, Sequence[ParamSlice]]) -> dict[str, list[str]]:
    """Each block's parameter names (each once, in piece order): the parameters a block's
    products differentiate with respect to.

    Example:
        >>> block_parameters({"q": [ParamSlice("w", 0, 0, 2), ParamSlice("b", 0, 0, 2)],
        ...                   "k": [ParamSlice("w", 0, 2, 4)]})
        {'q': ['w', 'b'], 'k': ['w']}
    """
    return {name: list(dict.fromkeys(p.param for p in block)) for name, block in blocks.items()}


def block_numel(block: Sequence[ParamSlice], shapes: Mapping[str, torch.Size]) -> int:
    """Number of elements of a block, given the parameters' shapes.

    Example:
        >>> block_numel([ParamSlice("w", 1, 0, 2), ParamSlice("b")],
        ...             {"w": torch.Size([3, 4]), "b": torch.Size([4])})
        10
    """
    return sum(piece.numel(shapes[piece.param]) for piece in block)


def block_flat_indices(
    block: Sequence[ParamSlice], shapes: Mapping[str, torch.Size]
) -> torch.Tensor:
    """int64 indices of a block's elements in the flat vector that concatenates the parameters
    of ``shapes`` in its order, each flattened row-major; pieces in list order, each ascending.

    Example:
        >>> shapes = {"w": torch.Size([2, 3]), "b": torch.Size([3])}
        >>> block_flat_indices([ParamSlice("w", 1, 2), ParamSlice("b", 0, 2)], shapes)
        tensor([2, 5, 8])
    """
    offsets: dict[str, int] = {}
    total = 0
    for name, shape in shapes.items():
        offsets[name] = total
        total += math.prod(int(s) for s in shape)
    missing = [p.param for p in block if p.param not in offsets]
    if missing:
        raise HesslensInputError(
            f"block pieces name parameters {missing} that are not in the flat vector's "
            f"parameters {list(shapes)[:8]}{' ...' if len(shapes) > 8 else ''}"
        )
    if not block:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat([p.flat_indices(shapes[p.param]) + offsets[p.param] for p in block])


def gather_block(
    block: Sequence[ParamSlice], tensors: Mapping[str, torch.Tensor], *, batch_dims: int = 0
) -> torch.Tensor:
    """A block's flat vector from per-parameter tensors (gradients, products, parameters):
    the pieces' elements in :func:`block_flat_indices` order, after ``batch_dims`` leading
    dimensions that are kept (a ``(k, *shape)`` stack gives ``(k, n)``).

    Example:
        >>> g = {"w": torch.arange(6.).reshape(2, 3), "b": torch.tensor([6., 7., 8.])}
        >>> gather_block([ParamSlice("w", 1, 2), ParamSlice("b", 0, 0, 2)], g)
        tensor([2., 5., 6., 7.])
    """
    parts = []
    for piece in block:
        t = piece.take(tensors[piece.param], batch_dims=batch_dims)
        parts.append(t.reshape(*t.shape[:batch_dims], -1))
    return torch.cat(parts, dim=batch_dims)


def scatter_block(
    block: Sequence[ParamSlice], vector: torch.Tensor, like: Mapping[str, torch.Tensor],
    *, batch_dims: int = 0
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`gather_block`: per-parameter tensors shaped like ``like`` (its
    parameters, in its order) that hold ``vector``'s entries at the block's elements and zero
    elsewhere; functional (no in-place writes), so it works under ``torch.func`` transforms.

    Example:
        >>> like = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
        >>> out = scatter_block([ParamSlice("w", 1, 2), ParamSlice("b", 0, 0, 2)],
        ...                     torch.tensor([1., 2., 3., 4.]), like)
        >>> out["w"], out["b"]
        (tensor([[0., 0., 1.],
                [0., 0., 2.]]), tensor([3., 4., 0.]))
    """
    lead = tuple(vector.shape[:batch_dims])
    sizes = [p.numel(like[p.param].shape) for p in block]
    if sum(sizes) != vector.shape[batch_dims]:
        raise HesslensInputError(
            f"the vector has {vector.shape[batch_dims]} entries, the block {sum(sizes)}")
    flat = {name: t.new_zeros(*lead, t.numel()) for name, t in like.items()}
    for piece, chunk in zip(block, torch.split(vector, sizes, dim=batch_dims)):
        idx = piece.flat_indices(like[piece.param].shape).to(vector.device)
        flat[piece.param] = flat[piece.param].index_copy(batch_dims, idx, chunk.to(
            flat[piece.param].dtype))
    return {name: flat[name].reshape(*lead, *t.shape) for name, t in like.items()}


def _matches(pattern: str, name: str) -> bool:
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


# --------------------------------------------------------------------------- mapping form
def _mapping_blocks(layers: Mapping[str, object], universe: ModelParameters) -> Blocks:
    blocks: Blocks = {}
    for raw_name, spec in layers.items():
        block = str(raw_name)
        if isinstance(spec, (str, ParamSlice)):
            items: list[object] = [spec]
        elif isinstance(spec, Iterable) and not isinstance(spec, Mapping):
            items = list(spec)
        else:
            raise HesslensInputError(
                f"block {block!r}: spec {spec!r} is not a parameter name, glob pattern, "
                "ParamSlice or list of these"
            )
        if not items:
            raise HesslensInputError(
                f"block {block!r} is empty: give it at least one parameter name, glob pattern "
                "or ParamSlice, or leave it out"
            )
        pieces: list[ParamSlice] = []
        for item in items:
            if isinstance(item, ParamSlice):
                name = universe.exact(item.param, block)
                if name is None:
                    raise HesslensInputError(
                        f"block {block!r}: {item} names no parameter of the model; "
                        f"{_suggest(item.param, universe)}"
                    )
                shape = universe.shapes[name]
                pieces.append(ParamSlice(name, item.dim, item.start, item.stop).canonical(shape))
            elif isinstance(item, str):
                pieces.extend(ParamSlice(n) for n in _expand(item, block, universe))
            else:
                raise HesslensInputError(
                    f"block {block!r}: {item!r} is not a parameter name, glob pattern or "
                    "ParamSlice"
                )
        blocks[block] = list(dict.fromkeys(pieces))  # the same piece twice in a block: once
    return blocks


def _expand(pattern: str, block: str, universe: ModelParameters) -> list[str]:
    """The trainable parameters a name or pattern stands for, in parameter order."""
    exact = universe.exact(pattern, block)
    if exact is not None:
        return [exact]
    hits = [name for name in universe.alias if _matches(pattern, name)]
    found = list(dict.fromkeys(universe.alias[n] for n in hits))
    kept = sorted((n for n in found if n in universe.trainable), key=universe.order.__getitem__)
    if kept:
        return kept
    if found:
        raise HesslensInputError(
            f"block {block!r}: pattern {pattern!r} matches only parameters that are not "
            f"trainable ({name_list(found, 5)}): make them trainable or change the pattern"
        )
    raise HesslensInputError(
        f"block {block!r}: {pattern!r} matches no trainable parameter; "
        f"{_suggest(pattern, universe)}"
    )


def _suggest(pattern: str, universe: ModelParameters) -> str:
    close = difflib.get_close_matches(pattern, universe.names, n=3, cutoff=0.5)
    hint = f"closest names: {close}; " if close else ""
    return (
        f"{hint}trainable parameters are {name_list(universe.names)} (patterns are fnmatch globs "
        "over these names or their dotted suffixes, e.g. 'h.*.attn.*')"
    )


# --------------------------------------------------------------------------- checks and order
def _check_disjoint(blocks: Blocks, universe: ModelParameters) -> None:
    """No element of any parameter in two pieces (of one block or of two)."""
    claimed: dict[str, list[tuple[str, ParamSlice]]] = {}
    for block, pieces in blocks.items():
        if not pieces:
            raise HesslensInputError(f"block {block!r} is empty: give it at least one piece")
        for piece in pieces:
            for other_block, other in claimed.get(piece.param, []):
                if _overlap(piece, other):
                    what = (f"parameter {piece.param!r}" if other == piece else
                            f"pieces {other} and {piece} overlap:")
                    where = (f"twice in block {block!r}" if other_block == block else
                             f"in both block {other_block!r} and block {block!r}")
                    raise HesslensInputError(
                        f"{what} elements {where}; each element may belong to one block only "
                        "(narrow a pattern, or split the ranges)"
                    )
            claimed.setdefault(piece.param, []).append((block, piece))


def _overlap(a: ParamSlice, b: ParamSlice) -> bool:
    """Whether two canonical, non-empty pieces of one parameter share an element."""
    if a.dim is None or b.dim is None or a.dim != b.dim:
        return True  # a slab along one dimension meets every slab along another
    return a.start < b.stop and b.start < a.stop  # type: ignore[operator]


def _sorted_blocks(
    model: nn.Module, blocks: Blocks, universe: ModelParameters, example_inputs: object
) -> Blocks:
    """Blocks in forward order: by the first call of the module owning each piece's parameter
    (or of its nearest called ancestor: ``nn.MultiheadAttention`` reads ``out_proj.weight``
    without calling ``out_proj``), then by parameter order; parameter order alone when there
    are no example inputs; modules the pass does not call go last, as in ``discover_layers``.
    Ties keep the given order."""
    ranks = {} if example_inputs is None else module_call_ranks(model, example_inputs)

    def rank(param: str) -> int:
        module = universe.owner.get(param, "")
        if not module or not ranks:
            return -1  # the model's own parameters, or no forward pass
        while module:
            if module in ranks:
                return ranks[module]
            module = module.rpartition(".")[0]
        return len(ranks)

    def key(name: str) -> tuple[int, int]:
        return min((rank(p.param), universe.order[p.param]) for p in blocks[name])

    return {name: blocks[name] for name in sorted(blocks, key=key)}
