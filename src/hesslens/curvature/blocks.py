"""Blocks beyond modules: which pieces of which parameters make up each curvature block.

A *block* is a list of :class:`ParamSlice` pieces: whole parameters, or contiguous ranges along
one dimension of a parameter, so that the query, key and value thirds of a fused attention
weight (GPT-2's ``c_attn``, PyTorch's ``in_proj_weight``) are blocks of their own.
:func:`resolve_blocks` builds them from a name (``"modules"``, ``"transformer"``,
``"transformer_heads"``) or from a mapping {block name: spec}, and checks them.

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
from dataclasses import dataclass

import torch
from torch import nn

from hesslens.curvature.layers import (
    ROOT_LAYER,
    forward_sorted,
    module_call_ranks,
    owned_parameters,
)
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


@dataclass(frozen=True)
class ParamSlice:
    """A contiguous range along one dimension of one parameter, or the whole parameter.

    ``dim=None`` is the whole tensor; otherwise the elements with index ``start <= i < stop``
    along ``dim`` (``stop=None``: to the end; a negative ``dim`` counts from the last). The
    parameter's shape is given to each method, so a slice is checked where it is used.

    Example:
        >>> w = torch.arange(12.).reshape(3, 4)
        >>> piece = ParamSlice("w", dim=1, start=1, stop=3)
        >>> piece.take(w)
        tensor([[ 1.,  2.],
                [ 5.,  6.],
                [ 9., 10.]])
        >>> piece.flat_indices(w.shape), piece.numel(w.shape)
        (tensor([ 1,  2,  5,  6,  9, 10]), 6)
    """

    param: str
    dim: int | None = None
    start: int = 0
    stop: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.param, str) or not self.param:
            raise HesslensInputError(
                f"ParamSlice.param must be a parameter name (a non-empty str), not "
                f"{self.param!r}"
            )
        for field in ("dim", "start", "stop"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise HesslensInputError(
                    f"ParamSlice({self.param!r}).{field} must be an int, not {value!r}"
                )
        if self.dim is None and (self.start != 0 or self.stop is not None):
            raise HesslensInputError(
                f"ParamSlice({self.param!r}) has start/stop but dim=None: give the dimension "
                "to slice along (dim=0 for a Linear weight's output rows)"
            )
        if self.start < 0 or (self.stop is not None and self.stop <= self.start):
            raise HesslensInputError(
                f"ParamSlice({self.param!r}, dim={self.dim}, start={self.start}, "
                f"stop={self.stop}) is empty or negative: use 0 <= start < stop"
            )

    def bounds(self, shape: torch.Size | Sequence[int]) -> tuple[int, int, int] | None:
        """``(dim, start, stop)`` resolved against ``shape`` (dim non-negative, stop an int), or
        None for the whole tensor; raises :class:`HesslensInputError` when out of range."""
        if self.dim is None:
            return None
        ndim = len(shape)
        if ndim == 0:
            raise HesslensInputError(
                f"{self}: parameter {self.param!r} is a scalar, it has no dim to slice: use "
                f"ParamSlice({self.param!r})")
        if not -ndim <= self.dim < ndim:
            raise HesslensInputError(
                f"{self}: dim {self.dim} is out of range for parameter {self.param!r} of shape "
                f"{tuple(shape)}: use a dim in 0..{ndim - 1}")
        dim = self.dim % ndim
        size = int(shape[dim])
        stop = size if self.stop is None else self.stop
        if stop > size or self.start >= size:
            raise HesslensInputError(
                f"{self}: range {self.start}:{stop} is out of range for dimension {dim} of "
                f"parameter {self.param!r}, of size {size} (shape {tuple(shape)})"
            )
        return dim, self.start, stop

    def canonical(self, shape: torch.Size | Sequence[int]) -> ParamSlice:
        """The same piece with ``dim`` non-negative and ``stop`` explicit; a range that covers
        the whole dimension becomes the whole parameter."""
        b = self.bounds(shape)
        if b is None or (b[1] == 0 and b[2] == int(shape[b[0]])):
            return ParamSlice(self.param)
        return ParamSlice(self.param, *b)

    def numel(self, shape: torch.Size | Sequence[int]) -> int:
        """Number of elements of the slice in a parameter of ``shape``."""
        b = self.bounds(shape)
        total = math.prod(int(s) for s in shape)
        if b is None:
            return total
        dim, start, stop = b
        return total // int(shape[dim]) * (stop - start)

    def flat_indices(self, shape: torch.Size | Sequence[int]) -> torch.Tensor:
        """int64 indices into ``param.reshape(-1)`` of the slice's elements, ascending."""
        b = self.bounds(shape)
        if b is None:
            return torch.arange(math.prod(int(s) for s in shape), dtype=torch.int64)
        dim, start, stop = b
        outer = math.prod(int(s) for s in shape[:dim])
        inner = math.prod(int(s) for s in shape[dim + 1:])
        size = int(shape[dim])
        rows = torch.arange(outer, dtype=torch.int64)[:, None, None] * (size * inner)
        mids = torch.arange(start, stop, dtype=torch.int64)[None, :, None] * inner
        cols = torch.arange(inner, dtype=torch.int64)[None, None, :]
        return (rows + mids + cols).reshape(-1)

    def take(self, tensor: torch.Tensor, *, batch_dims: int = 0) -> torch.Tensor:
        """The slice of ``tensor``, which has the parameter's shape after ``batch_dims``
        leading dimensions (e.g. 1 for a ``(k, *shape)`` stack of vectors); a view."""
        b = self.bounds(tensor.shape[batch_dims:])
        if b is None:
            return tensor
        dim, start, stop = b
        return tensor.narrow(batch_dims + dim, start, stop - start)

    def __str__(self) -> str:
        """Numpy-style: ``w[0:16]``, ``w[:, 16:32]``, ``w[..., 0:4]``."""
        if self.dim is None:
            return self.param
        span = f"{self.start}:{'' if self.stop is None else self.stop}"
        if self.dim >= 0:
            return f"{self.param}[{', '.join([':'] * self.dim + [span])}]"
        return f"{self.param}[{', '.join(['...', span] + [':'] * (-1 - self.dim))}]"


Blocks = dict[str, list[ParamSlice]]


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
      parameter once. Recognised by module structure: Hugging Face GPT-2 (fused Conv1D
      ``c_attn``, column thirds), BERT and ViT (query/key/value), Llama-style models (q_proj,
      k_proj, v_proj, o_proj; grouped-query attention included), GPT-NeoX and BLOOM
      (``query_key_value`` interleaved per head), Phi-3 (fused ``qkv_proj``, ``gate_up_proj``)
      and ``nn.MultiheadAttention`` (``in_proj_weight`` row thirds, e.g. inside
      ``nn.TransformerEncoderLayer``). A second attention in one layer (cross-attention) is
      named by its path, e.g. ``layers.0.multihead_attn.q``;
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
    universe = _Universe(model, trainable)
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
        blocks = _transformer_blocks(model, universe, heads=layers == "transformer_heads")
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


# --------------------------------------------------------------------------- the model's names
class _Universe:
    """The model's parameters: trainable names, shapes, order, aliases of tied weights."""

    def __init__(self, model: nn.Module, trainable: Sequence[str]) -> None:
        if isinstance(trainable, str):
            raise HesslensInputError(
                "trainable must be a list of parameter names, not one str")
        params = dict(model.named_parameters())
        unknown = [n for n in trainable if n not in params]
        if unknown:
            raise HesslensInputError(
                f"trainable names {unknown[:5]} are not parameters of the model; its "
                f"parameters are {_some(list(params))}"
            )
        self.trainable = set(trainable)
        self.order = {name: i for i, name in enumerate(params)}  # named_parameters order
        self.shapes = {name: p.shape for name, p in params.items()}
        self.names = [n for n in params if n in self.trainable]
        canonical = {id(p): name for name, p in params.items()}
        self.alias = {
            name: canonical[id(p)]
            for name, p in model.named_parameters(remove_duplicate=False)
        }
        self.owner = {}  # canonical parameter name -> the module that owns it first
        for module, names in owned_parameters(model, lambda _n, _p: True).items():
            for name in names:
                self.owner[name] = "" if module == ROOT_LAYER else module

    def exact(self, name: str, block: str) -> str | None:
        """The canonical trainable name of ``name`` (a tied weight's alias maps to the name
        ``named_parameters`` gives it); an error if it is a parameter but not trainable."""
        canonical = self.alias.get(name)
        if canonical is not None and canonical not in self.trainable:
            raise HesslensInputError(
                f"block {block!r}: parameter {name!r} is not trainable (requires_grad=False or "
                "left out of the trainable parameters): make it trainable or drop it from the "
                "block"
            )
        return canonical


def _some(names: Sequence[str], k: int = 8) -> str:
    shown = ", ".join(names[:k])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > k else ''}]"


def _matches(pattern: str, name: str) -> bool:
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


# --------------------------------------------------------------------------- mapping form
def _mapping_blocks(layers: Mapping[str, object], universe: _Universe) -> Blocks:
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


def _expand(pattern: str, block: str, universe: _Universe) -> list[str]:
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
            f"trainable ({_some(found, 5)}): make them trainable or change the pattern"
        )
    raise HesslensInputError(
        f"block {block!r}: {pattern!r} matches no trainable parameter; "
        f"{_suggest(pattern, universe)}"
    )


def _suggest(pattern: str, universe: _Universe) -> str:
    close = difflib.get_close_matches(pattern, universe.names, n=3, cutoff=0.5)
    hint = f"closest names: {close}; " if close else ""
    return (
        f"{hint}trainable parameters are {_some(universe.names)} (patterns are fnmatch globs "
        "over these names or their dotted suffixes, e.g. 'h.*.attn.*')"
    )


# --------------------------------------------------------------------------- checks and order
def _check_disjoint(blocks: Blocks, universe: _Universe) -> None:
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
    model: nn.Module, blocks: Blocks, universe: _Universe, example_inputs: object
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


# --------------------------------------------------------------------------- transformer preset
# What the preset recognises, relative to the attention module (projections) or to the layer
# module (MLP); the error for a model with none of these lists them.
_SEPARATE_QKV = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
_FUSED_LINEAR_QKV = ("qkv_proj", "qkv", "Wqkv")
# query_key_value laid out per head as (heads, 3, head_dim): GPT-NeoX (Pythia) and BLOOM. Falcon's
# layout differs by version, so the name alone is not enough.
_INTERLEAVED_QKV = {"GPTNeoXAttention": "query_key_value", "BloomAttention": "query_key_value"}
_FUSED_MLP = {"mlp.gate_up_proj": ("mlp_gate", "mlp_in")}  # Phi-3: gate rows, then up rows
_OUT_PROJ = ("o_proj", "out_proj", "c_proj", "dense", "proj", "o")
_OUT_PROJ_OF_PARENT = ("output.dense",)
_MLP = {
    "mlp_gate": ("mlp.gate_proj",),
    "mlp_in": ("mlp.c_fc", "mlp.fc1", "mlp.up_proj", "mlp.dense_h_to_4h", "mlp.fc_in",
               "intermediate.dense", "linear1", "fc1"),
    "mlp_out": ("mlp.c_proj", "mlp.fc2", "mlp.down_proj", "mlp.dense_4h_to_h", "mlp.fc_out",
                "output.dense", "linear2", "fc2"),
}
_LOOKED_FOR = (
    "nn.MultiheadAttention; a module with children c_attn (GPT-2 Conv1D, optional q_attn), "
    f"{' / '.join('+'.join(t) for t in _SEPARATE_QKV)} or a fused Linear "
    f"{' / '.join(_FUSED_LINEAR_QKV)}; query_key_value in {' / '.join(_INTERLEAVED_QKV)}"
)


@dataclass
class _Span:
    """One projection parameter's share of a role: ``param[dim-range]`` (dim None: whole), and
    whether it splits per head along that dim in chunks of ``head``."""

    piece: ParamSlice
    head: int | None = None
    first: int = 0  # the head number of its first chunk
    is_bias: bool = False


@dataclass
class _Attention:
    path: str
    roles: dict[str, list[_Span]]          # q, k, v, o
    whole: dict[str, str]                  # role -> projection module claimed with its subtree
    out_bias: list[ParamSlice]             # o's bias: not split per head


def _child(model_modules: Mapping[str, nn.Module], path: str, rel: str) -> str | None:
    full = f"{path}.{rel}" if path else rel
    return full if full in model_modules else None


def _dims(module: nn.Module) -> tuple[int, int]:
    """(output-feature dim, input-feature dim) of a projection's weight: Hugging Face's Conv1D
    stores (in, out), everything else (out, in) like nn.Linear."""
    return (1, 0) if type(module).__name__ == "Conv1D" else (0, 1)


def _attr(objs: Sequence[object], names: Sequence[str]) -> int | None:
    for obj in objs:
        for name in names:
            value = getattr(obj, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _head_sizes(model: nn.Module, module: nn.Module, q_size: int) -> tuple[int | None, int | None]:
    """(head_dim, number of key/value heads) from the attention module's attributes, else the
    model's config; None where neither says."""
    objs = [module, getattr(model, "config", None)]
    head_dim = _attr(objs[:1], ("head_dim", "attention_head_size", "head_size"))
    heads = _attr(objs, ("num_heads", "num_attention_heads", "n_head", "n_heads"))
    if head_dim is None:
        head_dim = _attr(objs[1:], ("head_dim",))
    if head_dim is None and heads is not None and q_size % heads == 0:
        head_dim = q_size // heads
    kv_heads = _attr(objs, ("num_key_value_heads", "num_kv_heads", "n_kv_heads"))
    return head_dim, kv_heads


def _projection(universe: _Universe, path: str, module: nn.Module, span: tuple[int, int] | None,
                head: int | None, dim: int | None = None, first: int = 0) -> list[_Span]:
    """The weight and bias of the projection at ``path``: whole, or the output-feature range
    ``span`` (the bias sliced the same way), splittable per head of size ``head``."""
    out_dim = _dims(module)[0] if dim is None else dim
    spans = []
    for pname in ("weight", "bias"):
        full = f"{path}.{pname}" if path else pname
        name = universe.alias.get(full)
        if name is None or name not in universe.trainable or not isinstance(
                getattr(module, pname, None), torch.Tensor):
            continue
        d = out_dim if pname == "weight" else 0
        if span is None:
            size = int(universe.shapes[name][d])
            piece = ParamSlice(name, d, 0, size)
        else:
            piece = ParamSlice(name, d, *span)
        spans.append(_Span(piece, head, first, is_bias=pname == "bias"))
    return spans


def _recognise(model: nn.Module, modules: Mapping[str, nn.Module], universe: _Universe,
               path: str, module: nn.Module) -> _Attention | None:
    """The q/k/v/o projections of the attention module at ``path``, or None if it is none."""
    def join(rel: str) -> str:
        return f"{path}.{rel}" if path else rel

    roles: dict[str, list[_Span]] = {}
    whole: dict[str, str] = {}
    if isinstance(module, nn.MultiheadAttention):
        e, hd = module.embed_dim, module.head_dim
        thirds = [(0, e), (e, 2 * e), (2 * e, 3 * e)]
        for role, (rel, span) in zip("qkv", zip(
                ("q_proj_weight", "k_proj_weight", "v_proj_weight"), thirds)):
            pieces = []
            if module.in_proj_weight is not None:
                pieces.append(("in_proj_weight", span))
            else:
                pieces.append((rel, (0, e)))
            if module.in_proj_bias is not None:
                pieces.append(("in_proj_bias", span))
            roles[role] = []
            for pname, sp in pieces:
                name = universe.alias.get(join(pname))
                if name in universe.trainable:
                    roles[role].append(_Span(ParamSlice(name, 0, *sp), hd))
        o_path = join("out_proj")
        return _finish(universe, path, roles, whole, o_path, modules[o_path], hd)
    children = dict(module.named_children())
    if "c_attn" in children:  # GPT-2: Conv1D (d, 3d), or (d, 2d) k|v beside q_attn
        c_attn = children["c_attn"]
        size = int(c_attn.weight.shape[_dims(c_attn)[0]])
        hd, _ = _head_sizes(model, module, size // (2 if "q_attn" in children else 3))
        parts = "kv" if "q_attn" in children else "qkv"
        if size % len(parts):
            return None
        step = size // len(parts)
        for i, role in enumerate(parts):
            roles[role] = _projection(universe, join("c_attn"), c_attn,
                                      (i * step, (i + 1) * step), hd)
        if "q_attn" in children:
            roles["q"] = _projection(universe, join("q_attn"), children["q_attn"], None, hd)
        return _finish(universe, path, roles, whole, *_out_proj(modules, path), hd)
    for names in _SEPARATE_QKV:
        if all(n in children for n in names):
            q = children[names[0]]
            q_size = int(q.weight.shape[_dims(q)[0]]) if isinstance(
                getattr(q, "weight", None), torch.Tensor) else 0
            hd, _ = _head_sizes(model, module, q_size)
            for role, n in zip("qkv", names):
                roles[role] = _projection(universe, join(n), children[n], None, hd)
                whole[role] = join(n)
            return _finish(universe, path, roles, whole, *_out_proj(modules, path), hd)
    fused_name = _INTERLEAVED_QKV.get(type(module).__name__)
    if fused_name is not None and isinstance(children.get(fused_name), nn.Linear):
        fused = children[fused_name]
        hd, _ = _head_sizes(model, module, fused.out_features // 3)
        if hd is None or fused.out_features % (3 * hd):
            return None
        for r, role in enumerate("qkv"):  # head h's q, k, v rows: (3h + r) * hd, + hd
            spans = [s for h in range(fused.out_features // (3 * hd))
                     for s in _projection(universe, join(fused_name), fused,
                                          ((3 * h + r) * hd, (3 * h + r + 1) * hd), hd, first=h)]
            roles[role] = sorted(spans, key=lambda s: s.is_bias)  # weight rows, then bias
        return _finish(universe, path, roles, whole, *_out_proj(modules, path), hd)
    for n in _FUSED_LINEAR_QKV:
        fused = children.get(n)
        if isinstance(fused, nn.Linear):
            size = fused.out_features
            hd, kv = _head_sizes(model, module, size // 3)
            heads = _attr([module, getattr(model, "config", None)],
                          ("num_heads", "num_attention_heads", "n_head", "n_heads"))
            if hd and kv and heads and (heads + 2 * kv) * hd == size:
                sizes = [heads * hd, kv * hd, kv * hd]
            elif size % 3 == 0:
                sizes = [size // 3] * 3
                hd, _ = _head_sizes(model, module, size // 3)
            else:
                return None
            starts = [0, sizes[0], sizes[0] + sizes[1], size]
            for i, role in enumerate("qkv"):
                roles[role] = _projection(universe, join(n), fused, (starts[i], starts[i + 1]),
                                          hd)
            return _finish(universe, path, roles, whole, *_out_proj(modules, path), hd)
    return None


def _out_proj(modules: Mapping[str, nn.Module], path: str) -> tuple[str | None, nn.Module | None]:
    parent = path.rpartition(".")[0]
    for rel in _OUT_PROJ:
        found = _child(modules, path, rel)
        if found is not None:
            return found, modules[found]
    for rel in _OUT_PROJ_OF_PARENT:
        found = _child(modules, parent, rel) if path else None
        if found is not None:
            return found, modules[found]
    return None, None


def _finish(universe: _Universe, path: str, roles: dict[str, list[_Span]], whole: dict[str, str],
            o_path: str | None, o_module: nn.Module | None, head: int | None) -> _Attention:
    out_bias: list[ParamSlice] = []
    if o_path is not None and o_module is not None:
        in_dim = _dims(o_module)[1]
        spans = _projection(universe, o_path, o_module, None, head, dim=in_dim)
        roles["o"] = [s for s in spans if not s.is_bias]
        out_bias = [s.piece for s in spans if s.is_bias]
        whole["o"] = o_path
    return _Attention(path, roles, whole, out_bias)


def _layer_path(path: str) -> str:
    """The transformer layer an attention module belongs to: its nearest ancestor that is an
    entry of a ModuleList (``transformer.h.0``), else its parent."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the ancestors parts[:i], nearest first
        if parts[i - 1].isdigit():
            return ".".join(parts[:i])
    return ".".join(parts[:-1])


def _transformer_blocks(model: nn.Module, universe: _Universe, *, heads: bool) -> Blocks:
    modules = dict(model.named_modules())
    attentions: list[_Attention] = []
    inside: list[str] = []
    for path, module in modules.items():
        if any(path.startswith(f"{p}.") for p in inside):
            continue
        found = _recognise(model, modules, universe, path, module)
        if found is not None:
            attentions.append(found)
            inside.append(path)
    if not attentions:
        raise HesslensInputError(
            f"layers='transformer' found no attention in {type(model).__name__}: it looked "
            f"for {_LOOKED_FOR}. Name the blocks yourself with a mapping, e.g. "
            "{'attn': 'layers.*.attn.*'}, or use layers='modules'"
        )
    blocks: Blocks = {}

    def add(name: str, pieces: list[ParamSlice]) -> None:
        if not pieces:
            return  # a frozen projection
        if name in blocks:
            raise HesslensInputError(
                f"layers='transformer' would name two blocks {name!r} in "
                f"{type(model).__name__}: name the blocks yourself with a mapping")
        blocks[name] = [p.canonical(universe.shapes[p.param]) for p in pieces]

    per_layer: dict[str, int] = {}
    for att in attentions:
        layer = _layer_path(att.path)
        count = per_layer.get(layer, 0)
        per_layer[layer] = count + 1
        tag = "attn" if count == 0 else att.path[len(layer) + 1:] if layer else att.path
        prefix = f"{layer}.{tag}" if layer else tag
        for role in "qkvo":
            spans = att.roles.get(role, [])
            if not heads:
                pieces = [s.piece for s in spans] + (att.out_bias if role == "o" else [])
                if role in att.whole:
                    pieces += _subtree_extras(modules, universe, att.whole[role], pieces)
                add(f"{prefix}.{role}", pieces)
                continue
            for h, pieces in enumerate(_per_head(spans, f"{prefix}.{role}")):
                add(f"{prefix}.{role}.head{h}", pieces)
            if role == "o":
                add(f"{prefix}.o.bias", att.out_bias)
    for layer in per_layer:
        done = set()
        for rel, roles in _FUSED_MLP.items():
            found = _child(modules, layer, rel)
            if found is not None and isinstance(modules[found], nn.Linear):
                half = modules[found].out_features // 2
                for i, role in enumerate(roles):
                    add(f"{layer}.{role}" if layer else role,
                        [s.piece for s in _projection(universe, found, modules[found],
                                                      (i * half, (i + 1) * half), None)])
                done.update(roles)
        for role, candidates in _MLP.items():
            if role in done:
                continue
            for rel in candidates:
                found = _child(modules, layer, rel)
                if found is not None and found not in {a.whole.get("o") for a in attentions}:
                    add(f"{layer}.{role}" if layer else role,
                        _subtree_extras(modules, universe, found, []))
                    break
    taken = {p.param for pieces in blocks.values() for p in pieces}
    leftover: dict[str, list[ParamSlice]] = {}
    for name in universe.names:
        if name not in taken:
            owner = universe.owner.get(name, "") or ROOT_LAYER
            leftover.setdefault(owner, []).append(ParamSlice(name))
    for owner, pieces in leftover.items():
        add(owner, pieces)
    covered: dict[str, int] = {}
    for pieces in blocks.values():
        for p in pieces:
            covered[p.param] = covered.get(p.param, 0) + p.numel(universe.shapes[p.param])
    partial = [n for n in universe.names if covered[n] != math.prod(universe.shapes[n])]
    if partial:  # a fused weight whose slices do not add up: the blocks would miss elements
        raise HesslensInputError(
            f"layers='transformer' could not split {partial[:3]} of {type(model).__name__} "
            "into whole blocks: name the blocks yourself with a mapping of ParamSlices")
    return blocks


def _subtree_extras(modules: Mapping[str, nn.Module], universe: _Universe, path: str,
                    have: list[ParamSlice]) -> list[ParamSlice]:
    """Trainable parameters in the subtree of ``path`` not already among ``have`` (a LoRA
    adapter inside ``q_proj`` belongs to the query block), as whole pieces."""
    seen = {p.param for p in have}
    out = []
    for rel, _ in modules[path].named_parameters():
        name = universe.alias.get(f"{path}.{rel}" if path else rel)
        if name in universe.trainable and name not in seen:
            seen.add(name)
            out.append(ParamSlice(name))
    return out


def _per_head(spans: list[_Span], role: str) -> list[list[ParamSlice]]:
    """Split each span along its dim into chunks of its head size, numbered from the span's
    ``first``: block h gets every span's chunk h (the weight's and the bias's share of head h)."""
    per_head: dict[int, list[ParamSlice]] = {}
    for span in spans:
        piece = span.piece
        if span.head is None:
            raise HesslensInputError(
                f"{role}: cannot tell the attention head size (no head_dim, num_heads or "
                "config.num_attention_heads): use layers='transformer' or name per-head "
                "ParamSlices yourself"
            )
        width = piece.stop - piece.start  # type: ignore[operator]
        if width % span.head:
            raise HesslensInputError(
                f"{role}: {piece} is {width} wide, not a multiple of the head size {span.head}")
        for h in range(width // span.head):
            start = piece.start + h * span.head
            per_head.setdefault(span.first + h, []).append(
                ParamSlice(piece.param, piece.dim, start, start + span.head))
    if sorted(per_head) != list(range(len(per_head))):
        raise HesslensInputError(f"{role}: its pieces do not number the heads 0, 1, ...")
    return [per_head[h] for h in range(len(per_head))]
