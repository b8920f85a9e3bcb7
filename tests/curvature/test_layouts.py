"""The transformer preset's table of layouts: a registered row makes a custom attention and MLP
recognised (blocks that are what the model computes, curvature equal to the dense float64
sub-block), rows are checked, T5 and DistilBERT are split by their own rows."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from torch import nn
from torch.func import functional_call

import hesslens as hl
from hesslens.curvature.blocks import ParamSlice, block_flat_indices, block_numel, resolve_blocks
from hesslens.curvature.layouts import (
    AttentionLayout,
    MLPLayout,
    layouts,
    register_layout,
    unregister_layout,
)
from hesslens.errors import HesslensInputError

transformers.logging.set_verbosity_error()


class ToyAttention(nn.Module):
    """Multi-head self-attention whose projections no built-in row knows."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.num_heads = heads
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y):
            return y.view(b, t, self.num_heads, -1).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        heads = _attention(q, k, v)
        return self.to_out(heads.transpose(1, 2).reshape(b, t, d))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v


class ToyLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.mixer = ToyAttention()
        self.expand, self.contract = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm(x))
        return x + self.contract(torch.tanh(self.expand(x)))


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, 8)
        self.layers = nn.ModuleList([ToyLayer(), ToyLayer()])
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h).mean(1)


TOY_ATTENTION = AttentionLayout("toy", q="to_q", k="to_k", v="to_v", o="to_out")
TOY_MLP = MLPLayout("toy-mlp", mlp_in="expand", mlp_out="contract")


@pytest.fixture
def toy_rows():
    register_layout(TOY_ATTENTION)
    register_layout(TOY_MLP)
    try:
        yield
    finally:
        for row in (TOY_ATTENTION, TOY_MLP):
            if row in layouts():
                unregister_layout(row.name)


def _names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {n: p.shape for n, p in model.named_parameters() if p.requires_grad}


def _claims(model: nn.Module, blocks) -> torch.Tensor:
    """How many blocks claim each element of the flat trainable vector."""
    shapes = _shapes(model)
    counts = torch.zeros(sum(math.prod(s) for s in shapes.values()), dtype=torch.int64)
    for block in blocks.values():
        counts.index_add_(0, block_flat_indices(block, shapes),
                          torch.ones(block_numel(block, shapes), dtype=torch.int64))
    return counts


def test_a_custom_attention_is_refused_until_its_layout_is_registered():
    model = ToyModel()
    with pytest.raises(HesslensInputError, match=r"found no attention.*register_layout"):
        resolve_blocks(model, "transformer", _names(model))
    register_layout(TOY_ATTENTION)
    register_layout(TOY_MLP)
    try:
        blocks = resolve_blocks(model, "transformer", _names(model))
    finally:
        unregister_layout("toy")
        unregister_layout("toy-mlp")
    for layer in ("layers.0", "layers.1"):
        for role in "qkvo":
            proj = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out"}[role]
            assert blocks[f"{layer}.attn.{role}"] == [ParamSlice(f"{layer}.mixer.{proj}.weight"),
                                                      ParamSlice(f"{layer}.mixer.{proj}.bias")]
        assert blocks[f"{layer}.mlp_in"] == [ParamSlice(f"{layer}.expand.weight"),
                                             ParamSlice(f"{layer}.expand.bias")]
        assert blocks[f"{layer}.mlp_out"][0] == ParamSlice(f"{layer}.contract.weight")
        assert blocks[f"{layer}.norm"] == [ParamSlice(f"{layer}.norm.weight"),
                                           ParamSlice(f"{layer}.norm.bias")]
    counts = _claims(model, blocks)
    assert torch.equal(counts, torch.ones_like(counts))
    with pytest.raises(HesslensInputError, match="found no attention"):  # taken out again
        resolve_blocks(model, "transformer", _names(model))


def test_registered_per_head_pieces_are_what_the_custom_attention_computes(toy_rows):
    model = ToyModel()
    blocks = resolve_blocks(model, "transformer_heads", _names(model))
    counts = _claims(model, blocks)
    assert torch.equal(counts, torch.ones_like(counts))
    attn = model.layers[1].mixer
    p = dict(model.named_parameters())
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))

    def project(pieces):
        w, b = pieces
        return x @ w.take(p[w.param]).T + b.take(p[b.param])

    prefix = "layers.1.attn"
    with torch.no_grad():
        heads = [_attention(*(project(blocks[f"{prefix}.{r}.head{h}"]) for r in "qkv"))
                 for h in range(2)]
        w_out = p["layers.1.mixer.to_out.weight"]
        out = sum(heads[h] @ blocks[f"{prefix}.o.head{h}"][0].take(w_out).T for h in range(2))
        out = out + blocks[f"{prefix}.o.bias"][0].take(p["layers.1.mixer.to_out.bias"])
        torch.testing.assert_close(out, attn(x), rtol=1e-5, atol=1e-6)


def _sub_hessian(model: nn.Module, loss, names: list[str]) -> torch.Tensor:
    """Dense float64 Hessian of ``loss(parameter values)`` in the parameters ``names`` alone,
    the others held: the sub-block of the full Hessian at those parameters, each flattened
    row-major, in the order given (reverse over reverse, as tests/curvature/test_hf_models.py)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [params[n].numel() for n in names]

    def of_sub_vector(u):
        values = dict(params)
        for name, chunk in zip(names, torch.split(u, sizes)):
            values[name] = chunk.view(params[name].shape)
        return loss(values)

    u = torch.cat([params[n].reshape(-1) for n in names])
    dense = torch.func.jacrev(torch.func.grad(of_sub_vector))(u)
    return (dense + dense.T) / 2


def test_registered_blocks_have_the_curvature_of_the_dense_sub_block(toy_rows):
    model = ToyModel().double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, 3, generator=g, dtype=torch.float64)
    y = torch.randn(6, 2, generator=g, dtype=torch.float64)
    H = hl.Hessian(model, nn.functional.mse_loss, (x, y), layers="transformer")

    def loss(values):
        return nn.functional.mse_loss(functional_call(model, values, (x,)), y)

    for block, proj in (("layers.0.attn.q", "layers.0.mixer.to_q"),
                        ("layers.1.attn.o", "layers.1.mixer.to_out")):
        dense = _sub_hessian(model, loss, [f"{proj}.weight", f"{proj}.bias"])
        exact = torch.linalg.eigvalsh(dense)
        assert exact.abs().max() > 1e-3  # a block the loss depends on
        torch.testing.assert_close(H.block(block).dense(), dense, rtol=1e-9, atol=1e-12)
        top = H.block(block).eigenvalues(k=1).values
        torch.testing.assert_close(top, exact[-1:], rtol=1e-6, atol=0)


def test_a_registered_row_goes_first_and_replaces_a_row_of_its_name():
    torch.manual_seed(3)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=24, vocab_size=31, max_position_embeddings=16)).eval()
    names = _names(llama)
    assert "model.layers.0.attn.o" in resolve_blocks(llama, "transformer", names)
    before = layouts()
    register_layout(AttentionLayout("no-output", q="q_proj", k="k_proj", v="v_proj", o="x"))
    register_layout(AttentionLayout("no-output", q="q_proj", k="k_proj", v="v_proj",
                                    o="nowhere"))
    try:
        rows = layouts()
        assert rows[0].name == "no-output" and rows[0].o == ("nowhere",)
        assert len(rows) == len(before) + 1
        blocks = resolve_blocks(llama, "transformer", names)
    finally:
        unregister_layout("no-output")
    # the registered row, tried before the built-in one, finds no output projection: o_proj is
    # left to a block named by its module
    assert "model.layers.0.attn.o" not in blocks
    assert blocks["model.layers.0.self_attn.o_proj"] == [
        ParamSlice("model.layers.0.self_attn.o_proj.weight")]
    assert layouts() == before


@pytest.mark.parametrize("make, message", [
    (lambda: AttentionLayout("", q="a", k="b", v="c"), "needs a name"),
    (lambda: AttentionLayout("x", q="a", k="b"), r"names \['q', 'k'\] of q, k, v"),
    (lambda: AttentionLayout("x"), "names none of q, k, v"),
    (lambda: AttentionLayout("x", q="a", k="b", v="c", qkv="d"), "drop qkv"),
    (lambda: AttentionLayout("x", q="a", qkv="d", interleaved=True), "interleaved=True needs"),
    (lambda: AttentionLayout("x", q="a", k="", v="c"), r"\.k must be a module path"),
    (lambda: AttentionLayout("x", qkv="d", o=["a"]), "o must be a path or a tuple"),
    (lambda: AttentionLayout("x", qkv="d", o=("a", 3)), r"\.o must be a module path"),
    (lambda: MLPLayout("x", mlp_in="a"), "needs mlp_out"),
    (lambda: MLPLayout("x", mlp_in="a", gate_up="b", mlp_out="c"), "needs mlp_out and either"),
    (lambda: MLPLayout("x", mlp_gate="a", gate_up="b", mlp_out="c"), "needs mlp_out and either"),
    (lambda: register_layout({"q": "to_q"}), "takes an AttentionLayout or an MLPLayout"),
    (lambda: unregister_layout("no-such-row"), r"no layout is called 'no-such-row'.*'gpt2'"),
])
def test_bad_rows_are_refused_by_name(make, message):
    with pytest.raises(HesslensInputError, match=message):
        make()


class _FalconLikeAttention(nn.Module):
    """A fused query_key_value whose layout is not GPT-NeoX's (as Falcon's), in a class no row
    names."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 2
        self.query_key_value, self.dense = nn.Linear(8, 24), nn.Linear(8, 8)


def test_rows_keyed_by_class_name_leave_other_classes_alone():
    model = nn.ModuleList([_FalconLikeAttention()])
    with pytest.raises(HesslensInputError, match=r"query_key_value .* in GPTNeoXAttention"):
        resolve_blocks(model, "transformer", _names(model))


# --------------------------------------------------------------------------- T5 and DistilBERT
def _t5(gated: bool = False) -> nn.Module:
    torch.manual_seed(4)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=16, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=8,
        vocab_size=13, decoder_start_token_id=0, pad_token_id=0,
        feed_forward_proj="gated-gelu" if gated else "relu")).eval()


def _distilbert() -> nn.Module:
    torch.manual_seed(5)
    return transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        dim=16, hidden_dim=32, n_layers=2, n_heads=2, vocab_size=13,
        max_position_embeddings=8, num_labels=3)).eval()


@pytest.mark.parametrize("gated", [False, True])
def test_t5_attentions_and_mlps_are_split_by_its_rows(gated):
    model = _t5(gated)
    blocks = resolve_blocks(model, "transformer", _names(model))
    cross = "decoder.block.0.layer.1.EncDecAttention"  # a second attention: named by its path
    attentions = {"encoder.block.0.attn": "encoder.block.0.layer.0.SelfAttention",
                  "decoder.block.0.attn": "decoder.block.0.layer.0.SelfAttention", cross: cross}
    for prefix, path in attentions.items():
        for role in "qkvo":
            assert blocks[f"{prefix}.{role}"] == [ParamSlice(f"{path}.{role}.weight")]
    for layer, sub in (("encoder.block.0", "layer.1"), ("decoder.block.0", "layer.2")):
        ff = f"{layer}.{sub}.DenseReluDense"
        if gated:  # wi_0 goes through the activation and gates wi_1
            assert blocks[f"{layer}.mlp_gate"] == [ParamSlice(f"{ff}.wi_0.weight")]
            assert blocks[f"{layer}.mlp_in"] == [ParamSlice(f"{ff}.wi_1.weight")]
        else:
            assert blocks[f"{layer}.mlp_in"] == [ParamSlice(f"{ff}.wi.weight")]
            assert f"{layer}.mlp_gate" not in blocks
        assert blocks[f"{layer}.mlp_out"] == [ParamSlice(f"{ff}.wo.weight")]
    # shared embeddings (tied to both embed_tokens and the head) once; the relative position
    # bias and the norms in blocks of their own
    assert blocks["shared"] == [ParamSlice("shared.weight")]
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
    assert blocks[bias] == [ParamSlice(f"{bias}.weight")]
    for preset in ("transformer", "transformer_heads"):
        counts = _claims(model, resolve_blocks(model, preset, _names(model)))
        assert counts.numel() == sum(p.numel() for p in model.parameters())
        assert torch.equal(counts, torch.ones_like(counts))


def _hooked(model: nn.Module, module: nn.Module, batch: dict):
    seen = {}
    handle = module.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen["x"], seen["out"]


def test_t5_and_distilbert_heads_are_the_rows_each_head_uses():
    t5, distilbert = _t5(), _distilbert()
    ids = torch.randint(1, 13, (2, 5), generator=torch.Generator().manual_seed(6))
    labels = ids[:, :3].clone()
    cases = [
        (t5, "decoder.block.0.layer.1.EncDecAttention.k",
         t5.decoder.block[0].layer[1].EncDecAttention.k, {"input_ids": ids, "labels": labels}),
        (distilbert, "distilbert.transformer.layer.1.attn.q",
         distilbert.distilbert.transformer.layer[1].attention.q_lin, {"input_ids": ids}),
    ]
    for model, block, projection, batch in cases:
        blocks = resolve_blocks(model, "transformer_heads", _names(model))
        x, out = _hooked(model, projection, batch)
        per_head = out.view(*out.shape[:-1], 2, 8)  # as both models view it: (.., heads, d_kv)
        p = dict(model.named_parameters())
        with torch.no_grad():
            for h in range(2):
                pieces = blocks[f"{block}.head{h}"]
                got = x @ pieces[0].take(p[pieces[0].param]).T
                if len(pieces) == 2:  # DistilBERT's projections have a bias
                    got = got + pieces[1].take(p[pieces[1].param])
                torch.testing.assert_close(got, per_head[..., h, :])


def test_distilbert_attention_and_ffn_are_split_by_its_rows():
    model = _distilbert()
    blocks = resolve_blocks(model, "transformer", _names(model))
    for i in range(2):
        layer = f"distilbert.transformer.layer.{i}"
        for role, proj in (("q", "q_lin"), ("k", "k_lin"), ("v", "v_lin"), ("o", "out_lin")):
            assert blocks[f"{layer}.attn.{role}"] == [
                ParamSlice(f"{layer}.attention.{proj}.weight"),
                ParamSlice(f"{layer}.attention.{proj}.bias")]
        assert blocks[f"{layer}.mlp_in"][0] == ParamSlice(f"{layer}.ffn.lin1.weight")
        assert blocks[f"{layer}.mlp_out"][0] == ParamSlice(f"{layer}.ffn.lin2.weight")
    counts = _claims(model, blocks)
    assert torch.equal(counts, torch.ones_like(counts))
