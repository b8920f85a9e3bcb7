"""Blocks beyond modules: the transformer preset's pieces are the parameters each role uses, the
index convention matches torch.func.hessian, and every kind of bad spec is refused by name."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from torch import nn
from torch.func import functional_call

from hesslens.curvature.blocks import (
    ParamSlice,
    block_flat_indices,
    block_numel,
    block_parameters,
    gather_block,
    resolve_blocks,
    scatter_block,
)
from hesslens.curvature.layers import discover_layers, select_layers
from hesslens.errors import HesslensInputError

transformers.logging.set_verbosity_error()


def _gpt2(**kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_embd=16, n_head=2, vocab_size=31, n_positions=16,
               attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg.update(kw)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()


def _bert() -> nn.Module:
    torch.manual_seed(1)
    return transformers.BertModel(transformers.BertConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
        vocab_size=31, max_position_embeddings=16)).eval()


def _vit() -> nn.Module:
    torch.manual_seed(2)
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
        image_size=8, patch_size=4, num_channels=1, num_labels=3)).eval()


def _llama() -> nn.Module:
    torch.manual_seed(3)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=24, vocab_size=31, max_position_embeddings=16)).eval()


def _encoder() -> nn.Module:
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


def _neox() -> nn.Module:
    torch.manual_seed(7)
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
        vocab_size=31, max_position_embeddings=16)).eval()


def _bloom() -> nn.Module:
    torch.manual_seed(8)
    return transformers.BloomForCausalLM(transformers.BloomConfig(
        n_layer=2, hidden_size=16, n_head=2, vocab_size=31)).eval()


def _phi3() -> nn.Module:
    torch.manual_seed(9)
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=24, vocab_size=31, max_position_embeddings=16, pad_token_id=0)).eval()


def _decoder() -> nn.Module:
    torch.manual_seed(10)
    return nn.TransformerDecoder(
        nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2).eval()


def _t5() -> nn.Module:
    torch.manual_seed(12)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=16, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=8,
        vocab_size=31, decoder_start_token_id=0, pad_token_id=0)).eval()


def _distilbert() -> nn.Module:
    torch.manual_seed(13)
    return transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(
        dim=16, hidden_dim=32, n_layers=2, n_heads=2, vocab_size=31,
        max_position_embeddings=16)).eval()


MODELS = {"gpt2": _gpt2, "bert": _bert, "vit": _vit, "llama": _llama, "encoder": _encoder}
# also recognised: interleaved (GPT-NeoX, BLOOM) and GQA-fused (Phi-3) QKV, cross-attention,
# T5's q/k/v/o (encoder-decoder) and DistilBERT's q_lin/k_lin/v_lin/out_lin
MORE_MODELS = {"neox": _neox, "bloom": _bloom, "phi3": _phi3, "decoder": _decoder,
               "gpt2_cross": lambda: _gpt2(add_cross_attention=True), "t5": _t5,
               "distilbert": _distilbert}
LAYER_PATHS = {
    "gpt2": ["transformer.h.0", "transformer.h.1"],
    "bert": ["encoder.layer.0", "encoder.layer.1"],
    "vit": ["vit.layers.0", "vit.layers.1"],
    "llama": ["model.layers.0", "model.layers.1"],
    "encoder": ["layers.0", "layers.1"],
}


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, build in {**MODELS, **MORE_MODELS}.items()}


def _names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {n: p.shape for n, p in model.named_parameters() if p.requires_grad}


def _counts(blocks, shapes) -> torch.Tensor:
    """How many blocks claim each element of the flat trainable vector."""
    total = sum(math.prod(s) for s in shapes.values())
    counts = torch.zeros(total, dtype=torch.int64)
    for block in blocks.values():
        counts.index_add_(0, block_flat_indices(block, shapes),
                          torch.ones(block_numel(block, shapes), dtype=torch.int64))
    return counts


# --------------------------------------------------------------------------- the preset
@pytest.mark.parametrize("preset", ["transformer", "transformer_heads"])
@pytest.mark.parametrize("arch", [*MODELS, *MORE_MODELS])
def test_preset_covers_every_trainable_element_exactly_once(models, arch, preset):
    model = models[arch]
    blocks = resolve_blocks(model, preset, _names(model))
    counts = _counts(blocks, _shapes(model))
    assert counts.numel() == sum(p.numel() for p in model.parameters())
    assert torch.equal(counts, torch.ones_like(counts))


@pytest.mark.parametrize("arch", list(MODELS))
def test_preset_names_attention_and_mlp_blocks_per_layer(models, arch):
    model = models[arch]
    blocks = resolve_blocks(model, "transformer", _names(model))
    for layer in LAYER_PATHS[arch]:
        for role in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp_in", "mlp_out"):
            assert f"{layer}.{role}" in blocks
        assert (f"{layer}.mlp_gate" in blocks) == (arch == "llama")
        # weight and bias of a projection in one block (Llama's projections have no bias)
        assert len(block_parameters(blocks)[f"{layer}.attn.q"]) == (1 if arch == "llama" else 2)


def test_preset_leaves_embeddings_norms_and_head_as_module_blocks(models):
    blocks = resolve_blocks(models["gpt2"], "transformer", _names(models["gpt2"]))
    for name in ("transformer.wte", "transformer.wpe", "transformer.h.0.ln_1",
                 "transformer.h.1.ln_2", "transformer.ln_f"):
        assert blocks[name] == [ParamSlice(f"{name}.weight")] + (
            [ParamSlice(f"{name}.bias")] if "ln" in name else [])
    assert not any(name.startswith("lm_head") for name in blocks)  # tied to wte: once
    llama = resolve_blocks(models["llama"], "transformer", _names(models["llama"]))
    assert llama["lm_head"] == [ParamSlice("lm_head.weight")]  # not tied in this config
    assert llama["model.layers.0.input_layernorm"] == [
        ParamSlice("model.layers.0.input_layernorm.weight")]


def test_preset_covers_only_trainable_parameters(models):
    model = models["gpt2"]
    trainable = [n for n in _names(model) if "attn" not in n or ".h.1." in n]
    blocks = resolve_blocks(model, "transformer", trainable)
    assert "transformer.h.0.attn.q" not in blocks and "transformer.h.1.attn.q" in blocks
    shapes = {n: s for n, s in _shapes(model).items() if n in trainable}
    counts = _counts(blocks, shapes)
    assert torch.equal(counts, torch.ones_like(counts))


def test_gqa_key_and_value_have_fewer_heads(models):
    model = models["llama"]
    blocks = resolve_blocks(model, "transformer_heads", _names(model))
    layer = "model.layers.1.attn"
    assert sorted(n for n in blocks if n.startswith(f"{layer}.q.")) == [
        f"{layer}.q.head{h}" for h in range(4)]
    assert sorted(n for n in blocks if n.startswith(f"{layer}.k.")) == [
        f"{layer}.k.head{h}" for h in range(2)]
    assert sorted(n for n in blocks if n.startswith(f"{layer}.v.")) == [
        f"{layer}.v.head{h}" for h in range(2)]
    attn = model.model.layers[1].self_attn
    x = torch.randn(3, 16)
    with torch.no_grad():
        keys = attn.k_proj(x).view(3, 2, 4)  # as LlamaAttention views them: (.., kv heads, dim)
        for h in range(2):
            (piece,) = blocks[f"{layer}.k.head{h}"]
            torch.testing.assert_close(x @ piece.take(attn.k_proj.weight).T, keys[:, h])
    (o0,) = blocks[f"{layer}.o.head0"]
    assert (o0.dim, o0.start, o0.stop) == (1, 0, 4)  # o_proj's input columns of head 0


def _causal_attention(q, k, v, causal: bool) -> torch.Tensor:
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[-2]
        mask = torch.ones(n, n, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores.softmax(-1) @ v


def test_gpt2_fused_qkv_pieces_are_the_columns_the_attention_uses(models):
    model = models["gpt2"]
    blocks = resolve_blocks(model, "transformer_heads", _names(model))
    whole = resolve_blocks(model, "transformer", _names(model))
    attn = model.transformer.h[1].attn
    seen = {}
    handle = attn.register_forward_hook(
        lambda _m, args, kwargs, out: seen.update(x=args[0] if args else kwargs["hidden_states"],
                                                  out=out[0]), with_kwargs=True)
    ids = torch.randint(0, 31, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    handle.remove()
    x = seen["x"]
    p = dict(model.named_parameters())

    def project(block):
        w, b = block
        return x @ w.take(p[w.param]) + b.take(p[b.param])

    with torch.no_grad():
        prefix = "transformer.h.1.attn"
        heads = [
            _causal_attention(*(project(blocks[f"{prefix}.{r}.head{h}"]) for r in "qkv"), True)
            for h in range(2)
        ]
        # the output projection, split by input rows per head (Conv1D weight is (in, out))
        out = sum(heads[h] @ blocks[f"{prefix}.o.head{h}"][0].take(p[f"{prefix}.c_proj.weight"])
                  for h in range(2)) + blocks[f"{prefix}.o.bias"][0].take(
                      p[f"{prefix}.c_proj.bias"])
        torch.testing.assert_close(out, seen["out"], rtol=1e-5, atol=1e-6)
        # the whole-q block is the first third of the columns, the same as its heads together
        q_w, q_b = whole[f"{prefix}.q"]
        torch.testing.assert_close(q_w.take(p[q_w.param]), attn.c_attn.weight[:, :16])
        torch.testing.assert_close(q_b.take(p[q_b.param]), attn.c_attn.bias[:16])
        torch.testing.assert_close(
            project(whole[f"{prefix}.v"]), attn.c_attn(x)[..., 32:])
        torch.testing.assert_close(
            project(whole[f"{prefix}.q"]),
            torch.cat([project(blocks[f"{prefix}.q.head{h}"]) for h in range(2)], -1))


def test_multihead_attention_in_proj_pieces_are_what_it_computes(models):
    model = models["encoder"]
    blocks = resolve_blocks(model, "transformer_heads", _names(model))
    mha = model.layers[0].self_attn
    p = dict(model.named_parameters())
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    prefix = "layers.0.attn"

    def project(block):
        w, b = block
        return x @ w.take(p[w.param]).T + b.take(p[b.param])

    with torch.no_grad():
        expected = mha(x, x, x, need_weights=False)[0]
        heads = [_causal_attention(*(project(blocks[f"{prefix}.{r}.head{h}"]) for r in "qkv"),
                                   False) for h in range(2)]
        w_out = p["layers.0.self_attn.out_proj.weight"]  # (out, in): heads split its columns
        out = sum(heads[h] @ blocks[f"{prefix}.o.head{h}"][0].take(w_out).T for h in range(2))
        out = out + blocks[f"{prefix}.o.bias"][0].take(p["layers.0.self_attn.out_proj.bias"])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def _hooked_output(model: nn.Module, module: nn.Module, ids: torch.Tensor):
    """The input and output of ``module`` in one forward pass of ``model`` on ``ids``."""
    seen = {}
    handle = module.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return seen["x"], seen["out"]


def _linear(pieces, p, x):
    """``x`` through the rows of a Linear that the (weight, bias) pieces select."""
    w, b = pieces
    return x @ w.take(p[w.param]).T + b.take(p[b.param])


@pytest.mark.parametrize("arch", ["neox", "bloom"])
def test_interleaved_qkv_pieces_are_the_rows_each_head_uses(models, arch):
    """GPT-NeoX and BLOOM lay query_key_value out per head as (heads, 3, head_dim)."""
    model = models[arch]
    blocks = resolve_blocks(model, "transformer_heads", _names(model))
    whole = resolve_blocks(model, "transformer", _names(model))
    layer, attn = (("gpt_neox.layers.1", model.gpt_neox.layers[1].attention) if arch == "neox"
                   else ("transformer.h.1", model.transformer.h[1].self_attention))
    ids = torch.randint(0, 31, (2, 5), generator=torch.Generator().manual_seed(2))
    x, fused = _hooked_output(model, attn.query_key_value, ids)
    per_head = fused.view(2, 5, 2, 3, 8)  # the models' own view of the fused output
    p = dict(model.named_parameters())
    with torch.no_grad():
        for h in range(2):
            for r, role in enumerate("qkv"):
                got = _linear(blocks[f"{layer}.attn.{role}.head{h}"], p, x)
                torch.testing.assert_close(got, per_head[:, :, h, r])
        q = whole[f"{layer}.attn.q"]  # two weight rows ranges, then the two bias ranges
        w_rows = torch.cat([piece.take(p[piece.param]) for piece in q[:2]])
        b_rows = torch.cat([piece.take(p[piece.param]) for piece in q[2:]])
        torch.testing.assert_close(x @ w_rows.T + b_rows, per_head[:, :, :, 0].reshape(2, 5, 16))


def test_phi3_fused_qkv_and_gate_up_are_split_as_the_model_splits_them(models):
    model = models["phi3"]
    blocks = resolve_blocks(model, "transformer_heads", _names(model))
    whole = resolve_blocks(model, "transformer", _names(model))
    layer = model.model.layers[0]
    ids = torch.randint(0, 31, (2, 5), generator=torch.Generator().manual_seed(3))
    p = dict(model.named_parameters())
    x, qkv = _hooked_output(model, layer.self_attn.qkv_proj, ids)
    with torch.no_grad():
        # 4 query heads then 2 key and 2 value heads of 4: columns 0:16, 16:24, 24:32
        for role, heads, offset in (("q", 4, 0), ("k", 2, 16), ("v", 2, 24)):
            assert sum(n.startswith(f"model.layers.0.attn.{role}.head") for n in blocks) == heads
            for h in range(heads):
                (w,) = blocks[f"model.layers.0.attn.{role}.head{h}"]
                torch.testing.assert_close(x @ w.take(p[w.param]).T,
                                           qkv[..., offset + 4 * h:offset + 4 * h + 4])
        y, gate_up = _hooked_output(model, layer.mlp.gate_up_proj, ids)
        gate, up = gate_up.chunk(2, dim=-1)  # as Phi3MLP splits it
        for role, part in (("mlp_gate", gate), ("mlp_in", up)):
            (w,) = whole[f"model.layers.0.{role}"]
            torch.testing.assert_close(y @ w.take(p[w.param]).T, part)


def test_a_second_attention_in_a_layer_is_named_by_its_path(models):
    blocks = resolve_blocks(models["decoder"], "transformer", _names(models["decoder"]))
    assert {"layers.0.attn.q", "layers.0.multihead_attn.q", "layers.1.multihead_attn.o",
            "layers.0.mlp_in", "layers.1.norm3"} <= set(blocks)
    cross = resolve_blocks(models["gpt2_cross"], "transformer", _names(models["gpt2_cross"]))
    assert cross["transformer.h.0.crossattention.q"] == [
        ParamSlice("transformer.h.0.crossattention.q_attn.weight"),
        ParamSlice("transformer.h.0.crossattention.q_attn.bias")]
    assert cross["transformer.h.0.crossattention.v"][0] == ParamSlice(
        "transformer.h.0.crossattention.c_attn.weight", 1, 16, 32)  # k | v beside q_attn


# --------------------------------------------------------------------------- ParamSlice
@pytest.mark.parametrize("shape, dim, start, stop", [
    ((5,), 0, 1, 4), ((3, 4), 0, 1, 3), ((3, 4), 1, 2, None), ((4, 3, 2, 2), 1, 0, 2),
    ((4, 3, 2, 2), -1, 1, 2), ((2, 6, 3), 2, 0, 1), ((3, 4), None, 0, None), ((), None, 0, None),
])
def test_flat_indices_gather_the_elements_take_returns(shape, dim, start, stop):
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    piece = ParamSlice("w", dim, start, stop)
    idx = piece.flat_indices(tensor.shape)
    assert idx.dtype == torch.int64 and bool((idx[1:] > idx[:-1]).all())
    torch.testing.assert_close(tensor.reshape(-1)[idx], piece.take(tensor).reshape(-1))
    assert piece.numel(tensor.shape) == idx.numel() == piece.take(tensor).numel()
    stacked = torch.stack([tensor, 2 * tensor])
    torch.testing.assert_close(piece.take(stacked, batch_dims=1)[1], 2 * piece.take(tensor))


def test_take_is_a_view():
    w = torch.zeros(3, 4)
    ParamSlice("w", 1, 1, 3).take(w).fill_(1.0)
    assert w.sum().item() == 6.0 and w[:, 0].sum().item() == 0.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=0, start=2, stop=2), "empty"), (dict(dim=0, start=-1), "negative"),
    (dict(start=1), "dim=None"), (dict(dim=0.5), "must be an int"),
])
def test_param_slice_refuses_bad_fields(kwargs, message):
    with pytest.raises(HesslensInputError, match=message):
        ParamSlice("w", **kwargs)


@pytest.mark.parametrize("arch", ["gpt2", "neox", "encoder"])
def test_gather_and_scatter_agree_with_flat_indices_and_cover_the_vector(models, arch):
    model = models[arch]
    blocks = resolve_blocks(model, "transformer_heads", _names(model))
    shapes = _shapes(model)
    gen = torch.Generator().manual_seed(4)
    stack = {n: torch.randn(3, *s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    flat = torch.cat([t.reshape(3, -1) for t in stack.values()], 1)  # (3, dim), row-major
    total = {n: torch.zeros_like(t) for n, t in stack.items()}
    for block in blocks.values():
        segment = gather_block(block, stack, batch_dims=1)
        torch.testing.assert_close(segment, flat[:, block_flat_indices(block, shapes)],
                                   rtol=0, atol=0)
        back = scatter_block(block, segment, {n: t[0] for n, t in stack.items()}, batch_dims=1)
        total = {n: total[n] + back[n] for n in total}
    for name in stack:  # each element written by exactly one block
        torch.testing.assert_close(total[name], stack[name], rtol=0, atol=0)
    block = blocks[next(iter(blocks))]  # scatter is functional: it runs under vmap
    like = {n: t[0] for n, t in stack.items()}
    segment = gather_block(block, stack, batch_dims=1)
    vmapped = torch.func.vmap(lambda v: scatter_block(block, v, like))(segment)
    batched = scatter_block(block, segment, like, batch_dims=1)
    for name in stack:
        torch.testing.assert_close(vmapped[name], batched[name], rtol=0, atol=0)
    torch.testing.assert_close(gather_block(block, {n: t[1] for n, t in stack.items()}),
                               segment[1], rtol=0, atol=0)


# --------------------------------------------------------------------------- mapping form
def test_glob_patterns_match_full_names_and_dotted_suffixes(models):
    model = models["gpt2"]
    names = _names(model)
    blocks = resolve_blocks(model, {"out": "h.*.attn.c_proj.*", "c_attn": "attn.c_attn.weight",
                                    "ln1": "transformer.h.?.ln_1.*", "wte": "wte.weight"},
                            names)
    assert [p.param for p in blocks["out"]] == [n for n in names if ".attn.c_proj." in n]
    assert [p.param for p in blocks["c_attn"]] == [
        "transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"]
    assert [p.param for p in blocks["ln1"]] == [n for n in names if ".ln_1." in n]
    assert blocks["wte"] == [ParamSlice("transformer.wte.weight")]
    blocks = resolve_blocks(model, {"attn": "h.*.attn.*"}, names)
    assert [p.param for p in blocks["attn"]] == [n for n in names if ".attn." in n]
    assert len(blocks["attn"]) == 8


def test_glob_pattern_overlapping_another_block_is_refused(models):
    model = models["gpt2"]
    with pytest.raises(HesslensInputError, match=r"parameter 'transformer.h.0.attn.c_attn.weight' "
                       r"elements in both block 'attn' and block 'c_attn'"):
        resolve_blocks(model, {"attn": "h.*.attn.*", "c_attn": "attn.c_attn.weight"},
                       _names(model))


def test_tied_alias_names_the_shared_parameter(models):
    model = models["gpt2"]
    blocks = resolve_blocks(model, {"head": "lm_head.weight"}, _names(model))
    assert blocks == {"head": [ParamSlice("transformer.wte.weight")]}


def test_mapping_of_exact_names_keeps_working(models):
    model = models["encoder"]
    names = _names(model)
    old = {"attn0": names[:4], "ffn0": ["layers.0.linear1.weight", "layers.0.linear1.bias"]}
    blocks = resolve_blocks(model, old, names)
    assert block_parameters(blocks) == old
    assert all(p.dim is None for block in blocks.values() for p in block)


def test_param_slices_in_a_mapping_are_checked_and_canonical(models):
    model = models["gpt2"]
    w = "transformer.h.0.attn.c_attn.weight"
    blocks = resolve_blocks(model, {
        "q": [ParamSlice(w, -1, 0, 16), ParamSlice("transformer.h.0.attn.c_attn.bias", 0, 0, 16)],
        "kv": ParamSlice(w, 1, 16), "all_rows": ParamSlice("transformer.wpe.weight", 0, 0, 16),
    }, _names(model))
    assert blocks["q"][0] == ParamSlice(w, 1, 0, 16)
    assert blocks["kv"] == [ParamSlice(w, 1, 16, 48)]
    assert blocks["all_rows"] == [ParamSlice("transformer.wpe.weight")]  # the whole tensor


def _tiny_mlp() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


@pytest.mark.parametrize("spec, message", [
    ({"a": "nothing.*"}, "matches no trainable parameter.*trainable parameters are"),
    ({"a": "0.wieght"}, "closest names: \\['0.weight'\\]"),
    ({"a": "2.*"}, "only parameters that are not trainable"),
    ({"a": "2.weight"}, "'2.weight' is not trainable"),
    ({"a": ["0.weight"], "b": ["0.weight"]}, "in both block 'a' and block 'b'"),
    ({"a": ParamSlice("0.weight", 0, 0, 3), "b": ParamSlice("0.weight", 0, 2, 4)}, "overlap"),
    ({"a": ParamSlice("0.weight", 0, 0, 2), "b": ParamSlice("0.weight", 1, 0, 1)}, "overlap"),
    ({"a": [ParamSlice("0.weight", 0, 0, 2), ParamSlice("0.weight", 0, 1, 3)]},
     "twice in block 'a'"),
    ({"a": ["0.*", "0.weight", ParamSlice("0.bias", 0, 0, 1)]}, "twice in block 'a'"),
    ({"a": []}, "block 'a' is empty"),
    ({"a": ParamSlice("0.weight", 0, 2, 5)}, "out of range for dimension 0.*of size 4"),
    ({"a": ParamSlice("0.weight", 1, 3)}, "out of range for dimension 1.*of size 3"),
    ({"a": ParamSlice("0.weight", 2)}, "dim 2 is out of range.*0..1"),
    ({"a": ParamSlice("0.bias", -2)}, "dim -2 is out of range"),
    ({"a": ParamSlice("nope")}, "names no parameter"),
    ({"a": 3}, "not a parameter name, glob pattern, ParamSlice"),
    ({"a": [3]}, "not a parameter name, glob pattern or ParamSlice"),
])
def test_bad_mapping_is_refused_by_name(spec, message):
    model = _tiny_mlp()
    model[2].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    with pytest.raises(HesslensInputError, match=message):
        resolve_blocks(model, spec, _names(model))


def test_disjoint_ranges_and_duplicate_whole_names_are_accepted():
    model = _tiny_mlp()
    blocks = resolve_blocks(model, {
        "a": [ParamSlice("0.weight", 0, 0, 2), "0.bias", "0.bias"],
        "b": ParamSlice("0.weight", 0, 2, 4)}, _names(model))
    assert blocks["a"] == [ParamSlice("0.weight", 0, 0, 2), ParamSlice("0.bias")]


@pytest.mark.parametrize("layers, message", [
    ("transformers", "unknown block preset 'transformers'"), (3, "must be None, one of"),
])
def test_bad_layers_argument_is_refused(layers, message):
    model = _tiny_mlp()
    with pytest.raises(HesslensInputError, match=message):
        resolve_blocks(model, layers, _names(model))


def test_transformer_preset_on_a_model_without_attention_says_what_it_looked_for():
    model = _tiny_mlp()
    with pytest.raises(HesslensInputError, match=r"nn.MultiheadAttention.*c_attn.*q_proj"):
        resolve_blocks(model, "transformer", _names(model))


def test_trainable_names_must_be_parameters():
    with pytest.raises(HesslensInputError, match="not parameters of the model"):
        resolve_blocks(_tiny_mlp(), None, ["0.weight", "3.weight"])


# --------------------------------------------------------------------------- order, selection
def test_modules_preset_is_discover_layers_as_whole_pieces(models):
    for model, example in ((_tiny_mlp(), torch.randn(2, 3)), (models["encoder"], None)):
        for layers in (None, "modules"):
            blocks = resolve_blocks(model, layers, _names(model), example)
            assert block_parameters(blocks) == discover_layers(model, example)


class _Reversed(nn.Module):
    """Registered in the reverse of the order it runs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.unused = nn.Linear(2, 2)
        self.last = nn.Linear(4, 2)
        self.first = nn.Linear(3, 4)

    def forward(self, x):
        return self.last(torch.tanh(self.first(x)))


def test_blocks_in_forward_order_with_example_inputs_else_parameter_order():
    model = _Reversed()
    spec = {"b_first": "first.*", "a_last": "last.weight", "c_last_bias": "last.bias",
            "d_unused": "unused.*"}
    assert list(resolve_blocks(model, spec, _names(model))) == [
        "d_unused", "a_last", "c_last_bias", "b_first"]
    assert list(resolve_blocks(model, spec, _names(model), torch.randn(1, 3))) == [
        "b_first", "a_last", "c_last_bias", "d_unused"]  # modules never called go last


def test_preset_blocks_in_forward_order_where_a_submodule_is_not_called(models):
    """nn.MultiheadAttention reads out_proj's weight without calling out_proj: its block sorts
    by the attention's call, not after everything the pass called."""
    model = models["encoder"]
    blocks = list(resolve_blocks(model, "transformer", _names(model), torch.randn(1, 3, 16)))
    assert blocks[:8] == ["layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v",
                          "layers.0.attn.o", "layers.0.norm1", "layers.0.mlp_in",
                          "layers.0.mlp_out", "layers.0.norm2"]  # post-norm layer order
    assert list(resolve_blocks(model, "transformer", _names(model)))[4:6] == [
        "layers.0.mlp_in", "layers.0.mlp_out"]  # parameter order without example inputs
    assert max(blocks.index(b) for b in blocks if b.startswith("layers.0.")) < min(
        blocks.index(b) for b in blocks if b.startswith("layers.1."))


def test_forward_order_probe_leaves_modes_and_batchnorm_statistics_alone():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    model[2].eval()  # a mixed state, restored as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = resolve_blocks(model, None, _names(model), torch.randn(8, 3))
    assert list(blocks) == ["0", "1", "3"]
    assert [m.training for m in model.modules()] == [True, True, True, False, True]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_llama_blocks_in_forward_order_with_mapping_inputs(models):
    model = models["llama"]
    batch = {"input_ids": torch.tensor([[1, 2, 3]])}
    blocks = list(resolve_blocks(model, "transformer", _names(model), batch))
    pos = {name: i for i, name in enumerate(blocks)}
    layer = "model.layers.0"
    assert pos[f"{layer}.input_layernorm"] < pos[f"{layer}.attn.q"] < pos[f"{layer}.attn.o"] \
        < pos[f"{layer}.post_attention_layernorm"] < pos[f"{layer}.mlp_out"] \
        < pos["model.layers.1.input_layernorm"]
    assert blocks[0] == "model.embed_tokens" and blocks[-1] == "lm_head"
    plain = list(resolve_blocks(model, "transformer", _names(model)))
    assert plain.index(f"{layer}.attn.q") < plain.index(f"{layer}.input_layernorm")


def test_select_layers_works_on_blocks(models):
    model = models["gpt2"]
    blocks = resolve_blocks(model, "transformer", _names(model))
    names = list(blocks)
    n = len(names)  # 19 blocks: 2 embeddings, 2 x 8 per layer, the final norm
    assert n == 19
    assert select_layers(blocks, "middle") == names[5:14]  # round(19/4) .. round(57/4)
    assert select_layers(blocks, "all") == names
    assert select_layers(blocks, "transformer.h.0.attn.q") == ["transformer.h.0.attn.q"]
    with pytest.raises(HesslensInputError, match="unknown layer name"):
        select_layers(blocks, "transformer.h.0.attn.qq")


# --------------------------------------------------------------------------- index convention
def test_block_flat_indices_pick_the_hessian_of_the_slice():
    """The sub-matrix of the dense Hessian over the concatenated trainable vector (row-major,
    named_parameters order) at a block's flat indices is the Hessian w.r.t. that block alone."""
    model = _gpt2(n_layer=1, n_embd=4, n_head=2, vocab_size=7, n_positions=4).double()
    with torch.no_grad():  # GPT-2's init (std 0.02) leaves the attention's curvature ~1e-7
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(
                param.numel()), dtype=param.dtype) * 0.5 + (1.0 if param.ndim == 1 else 0.0))
    trainable = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    shapes = {n: params[n].shape for n in trainable}
    ids = torch.randint(0, 7, (2, 4), generator=torch.Generator().manual_seed(0))

    def loss(values: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = functional_call(model, values, (ids,)).logits
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1))

    def unflatten(theta):
        parts = torch.split(theta, [math.prod(s) for s in shapes.values()])
        return {n: t.reshape(s) for (n, s), t in zip(shapes.items(), parts)}

    theta = torch.cat([params[n].detach().reshape(-1) for n in trainable])
    full = _hessian(lambda t: loss(unflatten(t)))(theta)
    torch.testing.assert_close(full, full.T, rtol=0, atol=1e-12)

    heads = resolve_blocks(model, "transformer_heads", trainable)
    mixed = resolve_blocks(model, {"mixed": [
        ParamSlice("transformer.h.0.mlp.c_proj.bias", 0, 1, 3),
        ParamSlice("transformer.h.0.attn.c_attn.weight", 0, 1, 3),
        "transformer.h.0.ln_2.weight"]}, trainable)
    whole = resolve_blocks(model, "transformer", trainable)
    chosen = [whole["transformer.h.0.attn.q"], whole["transformer.h.0.attn.k"],
              heads["transformer.h.0.attn.k.head1"], heads["transformer.h.0.attn.o.head0"],
              mixed["mixed"]]
    for block in chosen:
        idx = block_flat_indices(block, shapes)
        base = {n: params[n].detach() for n in trainable}

        def of_slices(slices, block=block, base=base):
            values = dict(base)
            for piece, s in zip(block, slices):
                values[piece.param] = _replace(values[piece.param], piece, s)
            return loss(values)

        start = tuple(piece.take(base[piece.param]).clone() for piece in block)
        h = _hessian(of_slices)(start)
        sizes = [t.numel() for t in start]
        dense = torch.cat([torch.cat([h[i][j].reshape(sizes[i], sizes[j])
                                      for j in range(len(block))], 1)
                           for i in range(len(block))], 0)
        torch.testing.assert_close(full[idx][:, idx], dense, rtol=1e-10, atol=1e-12)
        assert dense.abs().max() > 1e-3  # a block the loss depends on


def _hessian(f):
    """``torch.func.hessian`` as forward-over-``grad``: torch.func.hessian's own
    ``jacfwd(jacrev(f))`` is wrong through LayerNorm on torch 2.13 (0.4 off on a 3-layer MLP
    with one LayerNorm, asymmetric; the layer_norm backward batching rule, pytorch/functorch#534),
    while ``jacfwd(grad(f))`` matches double backward to 1e-16."""
    return torch.func.jacfwd(torch.func.grad(f))


def _replace(tensor: torch.Tensor, piece: ParamSlice, values: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the piece's elements replaced by ``values``, built by concatenating
    narrow views along the piece's dim (independent of ``flat_indices``)."""
    if piece.dim is None:
        return values
    d, start, stop = piece.bounds(tensor.shape)
    return torch.cat([tensor.narrow(d, 0, start), values,
                      tensor.narrow(d, stop, tensor.shape[d] - stop)], d)
