"""The transformer preset as a table of layouts: where q, k, v, o and the MLP sit in a model.

``layers="transformer"`` (:func:`hesslens.curvature.blocks.resolve_blocks`) walks the model's
modules and asks the rows of a table, in order, whether a module is an attention they know. An
:class:`AttentionLayout` row names the children that project to the queries, keys and values
(three modules, or one fused module whose output features it splits) and the output projection;
an :class:`MLPLayout` row names the projections of the MLP in the same transformer layer. A model
that no row knows gets a row of its own with :func:`register_layout`, without a change to the
package, as PEFT's per-architecture table of target modules takes a new architecture.

Example:
    >>> from torch import nn
    >>> from hesslens.curvature.blocks import resolve_blocks
    >>> class Attention(nn.Module):  # a custom attention with projections named its own way
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.num_heads = 2
    ...         self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(8, 8) for _ in "qkvo")
    >>> class Layer(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.mixer, self.up, self.down = Attention(), nn.Linear(8, 16), nn.Linear(16, 8)
    >>> model = nn.ModuleDict({"layers": nn.ModuleList([Layer(), Layer()])})
    >>> names = [name for name, _ in model.named_parameters()]
    >>> register_layout(AttentionLayout("to-qkv", q="to_q", k="to_k", v="to_v", o="to_out"))
    >>> register_layout(MLPLayout("up-down", mlp_in="up", mlp_out="down"))
    >>> blocks = resolve_blocks(model, "transformer", names)
    >>> [name for name in blocks if name.startswith("layers.0.")]  # doctest: +NORMALIZE_WHITESPACE
    ['layers.0.attn.q', 'layers.0.attn.k', 'layers.0.attn.v', 'layers.0.attn.o',
     'layers.0.mlp_in', 'layers.0.mlp_out']
    >>> [str(piece) for piece in resolve_blocks(model, "transformer_heads", names)[
    ...     "layers.1.attn.k.head1"]]
    ['layers.1.mixer.to_k.weight[4:8]', 'layers.1.mixer.to_k.bias[4:8]']
    >>> unregister_layout("to-qkv")
    >>> unregister_layout("up-down")
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hesslens.curvature.layers import ROOT_LAYER
from hesslens.curvature.pieces import Blocks, ModelParameters, ParamSlice
from hesslens.errors import HesslensInputError

__all__ = [
    "OUTPUT_PROJECTIONS",
    "AttentionLayout",
    "MLPLayout",
    "layouts",
    "register_layout",
    "transformer_blocks",
    "unregister_layout",
]

# Where a row that does not name its output projection looks for it: a child of the attention
# module, or ("../" prefix) of its parent, as BERT's attention.output.dense.
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "c_proj", "dense", "proj", "o", "../output.dense")
# Attributes that give head sizes, on the attention module or on model.config.
_HEAD_DIM = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim")
_HEADS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")


def _check_name(name: object, kind: str) -> None:
    if not isinstance(name, str) or not name:
        raise HesslensInputError(f"{kind} needs a name (a non-empty str), not {name!r}")


def _check_path(path: object, what: str, *, optional: bool = False) -> None:
    if path is None and optional:
        return
    if not isinstance(path, str) or not path.strip("./"):
        raise HesslensInputError(
            f"{what} must be a module path relative to the matched module (a non-empty str such "
            f"as 'q_proj' or 'mlp.c_fc'), not {path!r}")


# --------------------------------------------------------------------------- the rows
@dataclass(frozen=True)
class AttentionLayout:
    """How to find q, k, v and o under one attention module: one row of the table.

    ``q``, ``k``, ``v`` are the paths (relative to the attention module) of the children that
    project to the queries, keys and values. ``qkv`` is one fused projection holding the roles
    not named apart, its output features in the order q, k, v: GPT-2's ``c_attn`` (q | k | v
    columns of its Conv1D), or its k | v beside ``q="q_attn"`` in cross-attention; fewer key and
    value heads than query heads are read off ``num_key_value_heads``. ``interleaved=True``: the
    fused features run per head as ``(heads, 3, head_dim)`` (GPT-NeoX, BLOOM). ``o`` is the
    output projection's path, or paths tried in order; ``"../name"`` is a child of the
    attention's parent. ``module_type`` restricts the row to attention modules of that class
    name, for a layout the child names alone do not tell apart. Head sizes come from the
    attention module (``head_dim``, ``num_heads``, ...) or from ``model.config``.

    Example:
        >>> str(AttentionLayout("gpt2", qkv="c_attn", o="c_proj"))
        'gpt2: c_attn (q|k|v)'
    """

    name: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    o: str | tuple[str, ...] = OUTPUT_PROJECTIONS
    interleaved: bool = False
    module_type: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.name, "AttentionLayout")
        for field in ("q", "k", "v", "qkv", "module_type"):
            _check_path(getattr(self, field), f"AttentionLayout({self.name!r}).{field}",
                        optional=True)
        o = (self.o,) if isinstance(self.o, str) else self.o
        if not isinstance(o, tuple):
            raise HesslensInputError(
                f"AttentionLayout({self.name!r}).o must be a path or a tuple of paths, not "
                f"{self.o!r}")
        for path in o:
            _check_path(path, f"AttentionLayout({self.name!r}).o")
        object.__setattr__(self, "o", o)
        apart = [role for role in "qkv" if getattr(self, role) is not None]
        if self.qkv is None and len(apart) < 3:
            raise HesslensInputError(
                f"AttentionLayout({self.name!r}) names {apart or 'none'} of q, k, v: name all "
                "three projections, or the fused one with qkv='...' for those left out")
        if self.qkv is not None and len(apart) == 3:
            raise HesslensInputError(
                f"AttentionLayout({self.name!r}) names q, k, v apart and a fused qkv: drop qkv, "
                "or the roles the fused projection holds")
        if self.interleaved and (self.qkv is None or apart):
            raise HesslensInputError(
                f"AttentionLayout({self.name!r}): interleaved=True needs a fused qkv that holds "
                "all of q, k and v (q, k, v not named apart)")

    @property
    def fused_roles(self) -> tuple[str, ...]:
        """The roles the fused ``qkv`` projection holds, in the order of its features."""
        if self.qkv is None:
            return ()
        return tuple(role for role in "qkv" if getattr(self, role) is None)

    def __str__(self) -> str:
        parts = [getattr(self, role) for role in "qkv" if getattr(self, role) is not None]
        if self.qkv is not None:
            fused = "|".join(self.fused_roles) + (" per head" if self.interleaved else "")
            parts.append(f"{self.qkv} ({fused})")
        where = f" in {self.module_type}" if self.module_type else ""
        return f"{self.name}: {' + '.join(parts)}{where}"

    def _find(self, model: _Model, path: str) -> _Attention | None:
        """The projections of the module at ``path`` if this row describes it, else None."""
        module = model.modules[path]
        if self.module_type is not None and type(module).__name__ != self.module_type:
            return None
        rels = {role: getattr(self, role) for role in ("q", "k", "v", "qkv")}
        found = {role: model.child(path, rel) for role, rel in rels.items() if rel is not None}
        if None in found.values():
            return None
        fused = self.fused_roles
        if fused and _out_features(model.modules[found["qkv"]]) is None:
            return None  # a fused projection must have a weight to split
        if "q" in found:
            q_size = _out_features(model.modules[found["q"]]) or 0
        else:
            q_size = _out_features(model.modules[found["qkv"]]) // len(fused)
        head_dim, heads, kv_heads = model.head_sizes(module, q_size)
        apart = {role: found[role] for role in "qkv" if role in found}
        roles = {role: model.projection(p, head=head_dim) for role, p in apart.items()}
        if fused:
            split = _interleaved if self.interleaved else _consecutive
            shares = split(model, found["qkv"], fused, head_dim, heads, kv_heads)
            if shares is None:
                return None
            roles.update(shares)
        o_path = next((p for p in (model.child(path, rel) for rel in self.o) if p), None)
        return _attention(model, path, roles, apart, o_path, head_dim)


class _TorchMultiheadAttention:
    """``nn.MultiheadAttention``: row thirds of ``in_proj_weight`` (or ``q/k/v_proj_weight``
    when keys and values have their own sizes) and of ``in_proj_bias``; ``out_proj``."""

    name = "torch-mha"

    def __str__(self) -> str:
        return f"{self.name}: nn.MultiheadAttention"

    def _find(self, model: _Model, path: str) -> _Attention | None:
        module = model.modules[path]
        if not isinstance(module, nn.MultiheadAttention):
            return None
        e, head_dim = module.embed_dim, module.head_dim
        roles: dict[str, list[_Span]] = {}
        for i, role in enumerate("qkv"):
            third = (i * e, (i + 1) * e)
            pieces = ([("in_proj_weight", third)] if module.in_proj_weight is not None
                      else [(f"{role}_proj_weight", (0, e))])
            if module.in_proj_bias is not None:
                pieces.append(("in_proj_bias", third))
            roles[role] = [_Span(ParamSlice(name, 0, *rows), head_dim) for pname, rows in pieces
                           if (name := model.trainable(_join(path, pname))) is not None]
        return _attention(model, path, roles, {}, model.child(path, "out_proj"), head_dim)


@dataclass(frozen=True)
class MLPLayout:
    """How to find a transformer layer's MLP: one row of the table.

    ``mlp_in``, ``mlp_out`` and, for a gated MLP, ``mlp_gate`` are the paths of the projections
    relative to one module of the layer: the layer itself (BERT's ``intermediate.dense`` and
    ``output.dense``) or a module inside it (GPT-2's ``mlp`` with ``c_fc`` and ``c_proj``).
    ``gate_up`` is one fused projection whose output features are the gate's, then the
    input's (Phi-3's ``gate_up_proj``). A layer's MLP is the first of its modules, outermost
    first and attentions left out, where every path of a row exists.

    Example:
        >>> str(MLPLayout("llama-mlp", mlp_gate="gate_proj", mlp_in="up_proj",
        ...                mlp_out="down_proj"))
        'llama-mlp: gate_proj + up_proj + down_proj'
    """

    name: str
    mlp_in: str | None = None
    mlp_out: str | None = None
    mlp_gate: str | None = None
    gate_up: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.name, "MLPLayout")
        for field in ("mlp_in", "mlp_out", "mlp_gate", "gate_up"):
            _check_path(getattr(self, field), f"MLPLayout({self.name!r}).{field}",
                        optional=True)
        if self.mlp_out is None or (self.mlp_in is None) == (self.gate_up is None) or (
                self.gate_up is not None and self.mlp_gate is not None):
            raise HesslensInputError(
                f"MLPLayout({self.name!r}) needs mlp_out and either mlp_in (with mlp_gate for a "
                "gated MLP) or a fused gate_up projection")

    def __str__(self) -> str:
        parts = [self.mlp_gate, self.mlp_in, self.gate_up, self.mlp_out]
        return f"{self.name}: {' + '.join(p for p in parts if p is not None)}"

    def _find(self, model: _Model, path: str,
              taken: set[str]) -> dict[str, list[ParamSlice]] | None:
        """The MLP's pieces per role if this row describes the module at ``path``, else None;
        no projection may be one of the ``taken`` modules (an attention's output)."""
        rels = {"gate_up": self.gate_up, "mlp_gate": self.mlp_gate, "mlp_in": self.mlp_in,
                "mlp_out": self.mlp_out}
        found = {role: model.child(path, rel) for role, rel in rels.items() if rel is not None}
        if any(p is None or p in taken for p in found.values()):
            return None
        roles: dict[str, list[ParamSlice]] = {}
        if "gate_up" in found:
            size = _out_features(model.modules[found["gate_up"]])
            if size is None or size % 2:
                return None
            for i, role in enumerate(("mlp_gate", "mlp_in")):
                rows = (i * size // 2, (i + 1) * size // 2)
                roles[role] = [s.piece for s in model.projection(found["gate_up"], rows)]
        for role in ("mlp_gate", "mlp_in", "mlp_out"):
            if role in found:
                roles[role] = model.subtree(found[role], [])
        return roles


# The table: rows are tried in order, the first that matches wins; registered rows go first.
_ATTENTION: list[AttentionLayout | _TorchMultiheadAttention] = [
    _TorchMultiheadAttention(),
    AttentionLayout("gpt2-cross", q="q_attn", qkv="c_attn", o="c_proj"),  # k|v beside q_attn
    AttentionLayout("gpt2", qkv="c_attn", o="c_proj"),  # Conv1D: q|k|v columns
    AttentionLayout("llama", q="q_proj", k="k_proj", v="v_proj"),  # Mistral, OPT, BART, GPT-J
    AttentionLayout("bert", q="query", k="key", v="value"),  # RoBERTa, ViT: ../output.dense
    AttentionLayout("t5", q="q", k="k", v="v", o="o"),
    AttentionLayout("distilbert", q="q_lin", k="k_lin", v="v_lin", o="out_lin"),
    # query_key_value per head as (heads, 3, head_dim); Falcon's differs by version, so the
    # class name keys these rows
    AttentionLayout("gpt-neox", qkv="query_key_value", interleaved=True, o="dense",
                    module_type="GPTNeoXAttention"),
    AttentionLayout("bloom", qkv="query_key_value", interleaved=True, o="dense",
                    module_type="BloomAttention"),
    AttentionLayout("phi3", qkv="qkv_proj", o="o_proj"),  # fewer key/value heads
    AttentionLayout("qkv", qkv="qkv"),  # fused Linear, e.g. a timm-style ViT
    AttentionLayout("wqkv", qkv="Wqkv"),  # MPT, MosaicBERT
]
_MLP: list[MLPLayout] = [
    MLPLayout("llama-mlp", mlp_gate="gate_proj", mlp_in="up_proj", mlp_out="down_proj"),
    MLPLayout("phi3-mlp", gate_up="gate_up_proj", mlp_out="down_proj"),
    MLPLayout("t5-gated-mlp", mlp_gate="wi_0", mlp_in="wi_1", mlp_out="wo"),
    MLPLayout("t5-mlp", mlp_in="wi", mlp_out="wo"),
    MLPLayout("gpt2-mlp", mlp_in="c_fc", mlp_out="c_proj"),  # GPT-Neo too
    MLPLayout("bert-mlp", mlp_in="intermediate.dense", mlp_out="output.dense"),  # ViT, RoBERTa
    MLPLayout("fc-mlp", mlp_in="fc1", mlp_out="fc2"),  # OPT, BART, CLIP, Phi
    MLPLayout("gpt-neox-mlp", mlp_in="dense_h_to_4h", mlp_out="dense_4h_to_h"),  # BLOOM, Falcon
    MLPLayout("gpt-j-mlp", mlp_in="fc_in", mlp_out="fc_out"),
    MLPLayout("up-down-mlp", mlp_in="up_proj", mlp_out="down_proj"),  # ungated, e.g. MPT
    MLPLayout("torch-mlp", mlp_in="linear1", mlp_out="linear2"),  # nn.TransformerEncoderLayer
    MLPLayout("distilbert-mlp", mlp_in="lin1", mlp_out="lin2"),
]


def register_layout(layout: AttentionLayout | MLPLayout) -> None:
    """Add a row to the table of the ``"transformer"`` presets, ahead of the built-in rows.

    Names are unique in the table: a row of the same name, attention or MLP, is replaced (so
    registering twice is harmless, and a built-in row can be redefined). The row holds for every
    later ``layers="transformer"`` in this process; :func:`unregister_layout` takes it out. See
    the module's example.
    """
    if isinstance(layout, AttentionLayout):
        table: list = _ATTENTION
    elif isinstance(layout, MLPLayout):
        table = _MLP
    else:
        raise HesslensInputError(
            f"register_layout takes an AttentionLayout or an MLPLayout, not "
            f"{type(layout).__name__}")
    _remove(layout.name)
    table.insert(0, layout)


def unregister_layout(name: str) -> None:
    """Take the row called ``name`` out of the table (a built-in row too).

    Example:
        >>> unregister_layout("no-such-row")
        Traceback (most recent call last):
        ...
        hesslens.errors.HesslensInputError: no layout is called 'no-such-row'; ...
    """
    if not _remove(name):
        raise HesslensInputError(
            f"no layout is called {name!r}; the table has "
            f"{[row.name for row in layouts()]}")


def layouts() -> tuple[AttentionLayout | _TorchMultiheadAttention | MLPLayout, ...]:
    """The rows of the table in the order they are tried: attention rows, then MLP rows.

    Example:
        >>> [str(row) for row in layouts()][:3]  # doctest: +NORMALIZE_WHITESPACE
        ['torch-mha: nn.MultiheadAttention', 'gpt2-cross: q_attn + c_attn (k|v)',
         'gpt2: c_attn (q|k|v)']
    """
    return (*_ATTENTION, *_MLP)


def _remove(name: str) -> bool:
    removed = False
    for table in (_ATTENTION, _MLP):
        for row in [row for row in table if row.name == name]:
            table.remove(row)
            removed = True
    return removed


# --------------------------------------------------------------------------- the preset
def transformer_blocks(model: nn.Module, params: ModelParameters, *, heads: bool) -> Blocks:
    """The blocks of ``layers="transformer"`` (``heads=True``: ``"transformer_heads"``), not yet
    checked for overlap or sorted: per layer ``<layer>.attn.q``, ``.k``, ``.v``, ``.o``
    (split per head with ``heads``), ``<layer>.mlp_in``, ``.mlp_out`` (``.mlp_gate``), and
    every other trainable parameter in a block named by the module that owns it.

    ``<layer>`` is the path of the layer module around each attention (``transformer.h.0``);
    a second attention in a layer (cross-attention) is named by its path below the layer.
    Raises :class:`HesslensInputError` if no row of the table finds an attention, or if the
    pieces would not cover every trainable element.
    """
    found = _Model(model, params)
    attentions = _find_attentions(found)
    if not attentions:
        raise HesslensInputError(
            f"layers='transformer' found no attention in {type(model).__name__}: it looked for "
            f"{'; '.join(str(row) for row in _ATTENTION)}. Register the model's layout "
            "(hesslens.curvature.layouts.register_layout(AttentionLayout('mine', q='to_q', "
            "k='to_k', v='to_v', o='to_out'))), name the blocks yourself with a mapping, e.g. "
            "{'attn': 'layers.*.attn.*'}, or use layers='modules'")
    blocks = _Blocks(type(model).__name__, params)
    per_layer: dict[str, list[_Attention]] = {}
    for attention in attentions:
        per_layer.setdefault(_layer_path(found.modules, attention.path), []).append(attention)
    outputs = {a.whole["o"] for a in attentions if "o" in a.whole}
    for layer, in_layer in per_layer.items():
        for i, attention in enumerate(in_layer):
            tag = "attn" if i == 0 else attention.path[len(layer) + 1:] if layer else attention.path
            for name, pieces in _attention_blocks(found, attention, _join(layer, tag), heads):
                blocks.add(name, pieces)
        for role, pieces in _mlp_roles(found, layer, attentions, outputs).items():
            blocks.add(_join(layer, role), pieces)
    taken = {piece.param for pieces in blocks.values() for piece in pieces}
    for owner, names in _owners(params, [n for n in params.names if n not in taken]).items():
        blocks.add(owner, [ParamSlice(name) for name in names])
    _check_covered(blocks, params, type(model).__name__)
    return dict(blocks)


@dataclass
class _Span:
    """One projection parameter's share of a role: ``piece`` (a range along the parameter's
    output-feature dim, or input-feature dim for o), split per head in chunks of ``head``."""

    piece: ParamSlice
    head: int | None = None
    first: int = 0  # the head number of its first chunk
    is_bias: bool = False


@dataclass
class _Attention:
    path: str
    roles: dict[str, list[_Span]]  # q, k, v, o (o: its weight's input features)
    whole: dict[str, str]  # role -> projection module, claimed with its whole subtree
    out_bias: list[ParamSlice]  # o's bias: not split per head


class _Model:
    """The model the preset splits: its modules by path, its parameters, its config."""

    def __init__(self, model: nn.Module, params: ModelParameters) -> None:
        self.modules = dict(model.named_modules())
        self.params = params
        self.config = getattr(model, "config", None)

    def child(self, path: str, rel: str) -> str | None:
        """The path of module ``rel`` below ``path`` (``"../x"``: below its parent), if any."""
        while rel.startswith("../"):
            if not path:
                return None
            path, rel = path.rpartition(".")[0], rel[3:]
        full = _join(path, rel)
        return full if full in self.modules else None

    def trainable(self, name: str) -> str | None:
        """The canonical name of parameter ``name`` (tied weights), if it is trainable."""
        canonical = self.params.alias.get(name)
        return canonical if canonical in self.params.trainable else None

    def projection(self, path: str, rows: tuple[int, int] | None = None,
                   head: int | None = None, *, dim: int | None = None,
                   first: int = 0) -> list[_Span]:
        """The trainable weight and bias of the projection at ``path``: whole, or the range
        ``rows`` of its output features (the bias sliced alike); ``dim`` overrides the
        weight's dim (the input features, for an output projection's heads)."""
        module = self.modules[path]
        weight_dim = _dims(module)[0] if dim is None else dim
        spans = []
        for pname, d in (("weight", weight_dim), ("bias", 0)):
            name = self.trainable(_join(path, pname))
            if name is None or not isinstance(getattr(module, pname, None), torch.Tensor):
                continue
            start, stop = rows if rows is not None else (0, int(self.params.shapes[name][d]))
            spans.append(_Span(ParamSlice(name, d, start, stop), head, first, pname == "bias"))
        return spans

    def subtree(self, path: str, have: Sequence[ParamSlice]) -> list[ParamSlice]:
        """Trainable parameters under ``path`` not among ``have``, as whole pieces (a LoRA
        adapter inside ``q_proj`` belongs to the query block)."""
        seen = {piece.param for piece in have}
        out = []
        for rel, _ in self.modules[path].named_parameters():
            name = self.trainable(_join(path, rel))
            if name is not None and name not in seen:
                seen.add(name)
                out.append(ParamSlice(name))
        return out

    def head_sizes(self, module: nn.Module, q_size: int) -> tuple[int | None, ...]:
        """(head_dim, query heads, key/value heads) from the attention module's attributes,
        else ``model.config``; None where neither says."""
        head_dim = _attr([module], _HEAD_DIM) or _attr([self.config], ("head_dim",))
        heads = _attr([module, self.config], _HEADS)
        if head_dim is None and heads is not None and q_size > 0 and q_size % heads == 0:
            head_dim = q_size // heads
        return head_dim, heads, _attr([module, self.config], _KV_HEADS)


def _find_attentions(model: _Model) -> list[_Attention]:
    """Every attention module a row recognises, outermost first (none inside another)."""
    found: list[_Attention] = []
    for path in model.modules:
        if any(_inside(path, a.path) for a in found):
            continue
        for row in _ATTENTION:
            attention = row._find(model, path)
            if attention is not None:
                found.append(attention)
                break
    return found


def _consecutive(model: _Model, path: str, roles: tuple[str, ...], head_dim: int | None,
                 heads: int | None, kv_heads: int | None) -> dict[str, list[_Span]] | None:
    """The roles' features one after another: q | k | v, with fewer key/value heads where
    ``heads + 2 kv_heads`` heads fill the projection, else equal parts."""
    size = _out_features(model.modules[path])
    if len(roles) == 3 and head_dim and heads and kv_heads and (
            heads + 2 * kv_heads) * head_dim == size:
        sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    elif size % len(roles) == 0:
        sizes = [size // len(roles)] * len(roles)
    else:
        return None
    starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return {role: model.projection(path, (starts[i], starts[i + 1]), head_dim)
            for i, role in enumerate(roles)}


def _interleaved(model: _Model, path: str, roles: tuple[str, ...], head_dim: int | None,
                 heads: int | None, kv_heads: int | None) -> dict[str, list[_Span]] | None:
    """Features per head as (heads, 3, head_dim): head h's role r is rows (3h + r) * head_dim
    onwards; each role's weight ranges come first, then its bias ranges."""
    size = _out_features(model.modules[path])
    if head_dim is None or size % (3 * head_dim):
        return None
    shares = {}
    for r, role in enumerate(roles):
        spans = [span for h in range(size // (3 * head_dim))
                 for span in model.projection(path, ((3 * h + r) * head_dim,
                                                     (3 * h + r + 1) * head_dim), head_dim,
                                              first=h)]
        shares[role] = sorted(spans, key=lambda span: span.is_bias)
    return shares


def _attention(model: _Model, path: str, roles: dict[str, list[_Span]], whole: dict[str, str],
               o_path: str | None, head_dim: int | None) -> _Attention:
    """The found attention, with the output projection split by its input features."""
    out_bias: list[ParamSlice] = []
    whole = dict(whole)
    if o_path is not None:
        spans = model.projection(o_path, head=head_dim, dim=_dims(model.modules[o_path])[1])
        roles["o"] = [s for s in spans if not s.is_bias]
        out_bias = [s.piece for s in spans if s.is_bias]
        whole["o"] = o_path
    return _Attention(path, roles, whole, out_bias)


def _attention_blocks(model: _Model, attention: _Attention, prefix: str,
                      heads: bool) -> Iterator[tuple[str, list[ParamSlice]]]:
    """(name, pieces) of q, k, v, o: whole roles (with the rest of each projection's subtree),
    or one block per head and o's bias apart."""
    for role in "qkvo":
        spans = attention.roles.get(role, [])
        if not heads:
            pieces = [s.piece for s in spans] + (attention.out_bias if role == "o" else [])
            if role in attention.whole:
                pieces += model.subtree(attention.whole[role], pieces)
            yield f"{prefix}.{role}", pieces
            continue
        for h, pieces in enumerate(_per_head(spans, f"{prefix}.{role}")):
            yield f"{prefix}.{role}.head{h}", pieces
        if role == "o":
            yield f"{prefix}.o.bias", attention.out_bias


def _mlp_roles(model: _Model, layer: str, attentions: list[_Attention],
               outputs: set[str]) -> dict[str, list[ParamSlice]]:
    """The pieces of the layer's MLP per role: the first module of the layer (outermost first,
    attentions left out) that an MLP row describes; {} if none does."""
    for path in model.modules:
        if not _inside(path, layer, itself=True) or any(_inside(path, a.path, itself=True)
                                                         for a in attentions):
            continue
        for row in _MLP:
            roles = row._find(model, path, outputs)
            if roles is not None:
                return roles
    return {}


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


def _layer_path(modules: Mapping[str, nn.Module], path: str) -> str:
    """The transformer layer an attention belongs to: its nearest ancestor that is an entry of a
    list of modules of one type (GPT-2's ``transformer.h.0``; T5's ``encoder.block.0``, not the
    mixed list of sub-layers inside it), else its nearest list entry, else its parent."""
    parts = path.split(".")
    entries = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if parts[i - 1].isdigit()]
    for entry in entries:
        container = modules[entry.rpartition(".")[0]]
        if len({type(m) for m in container.children()}) == 1:
            return entry
    return entries[0] if entries else ".".join(parts[:-1])


def _owners(params: ModelParameters, names: Sequence[str]) -> dict[str, list[str]]:
    """``names`` grouped by the module that owns each (``ROOT_LAYER`` for the model's own)."""
    owners: dict[str, list[str]] = {}
    for name in names:
        owners.setdefault(params.owner.get(name, "") or ROOT_LAYER, []).append(name)
    return owners


class _Blocks(dict):
    """Blocks as the preset adds them: canonical pieces, empty blocks (a frozen projection)
    left out, a name given twice refused."""

    def __init__(self, model_name: str, params: ModelParameters) -> None:
        super().__init__()
        self.model_name, self.params = model_name, params

    def add(self, name: str, pieces: list[ParamSlice]) -> None:
        if not pieces:
            return
        if name in self:
            raise HesslensInputError(
                f"layers='transformer' would name two blocks {name!r} in {self.model_name}: "
                "name the blocks yourself with a mapping")
        self[name] = [p.canonical(self.params.shapes[p.param]) for p in pieces]


def _check_covered(blocks: Blocks, params: ModelParameters, model_name: str) -> None:
    """Every trainable parameter wholly in the blocks: a fused weight whose slices do not add
    up would leave elements out."""
    covered = dict.fromkeys(params.names, 0)
    for pieces in blocks.values():
        for p in pieces:
            covered[p.param] += p.numel(params.shapes[p.param])
    partial = [n for n in params.names if covered[n] != math.prod(params.shapes[n])]
    if partial:
        raise HesslensInputError(
            f"layers='transformer' could not split {partial[:3]} of {model_name} into whole "
            "blocks: name the blocks yourself with a mapping of ParamSlices")


def _out_features(module: nn.Module) -> int | None:
    """The number of output features of a projection with a 2-d weight, else None."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        return None
    return int(weight.shape[_dims(module)[0]])


def _dims(module: nn.Module) -> tuple[int, int]:
    """(output-feature dim, input-feature dim) of a projection's weight: Hugging Face's Conv1D
    stores (in, out), everything else (out, in) like nn.Linear."""
    return (1, 0) if type(module).__name__ == "Conv1D" else (0, 1)


def _attr(objs: Sequence[object], names: Sequence[str]) -> int | None:
    """The first positive int attribute among ``names`` of the first of ``objs`` that has one."""
    for obj in objs:
        for name in names:
            value = getattr(obj, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _inside(path: str, ancestor: str, *, itself: bool = False) -> bool:
    """Whether module ``path`` lies below module ``ancestor`` (or is it, with ``itself``)."""
    if path == ancestor:
        return itself
    return ancestor == "" or path.startswith(f"{ancestor}.")


def _join(path: str, rel: str) -> str:
    return f"{path}.{rel}" if path else rel
