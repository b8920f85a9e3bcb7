"""Hugging Face models as they come: dict batches, their own loss, the default attention kernel,
blocks inside the fused QKV weight, against dense float64 Hessians of the same loss."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)

import hesslens as hl
from hesslens.curvature.blocks import block_flat_indices
from hesslens.errors import DataChangedError, HesslensInputError

VOCAB, T = 11, 6


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=VOCAB, n_positions=T,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).double().eval()


def lm_batches(sizes=(3, 2), seed: int = 0):
    """Uneven batches of dicts; some label tokens masked with -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        ids = torch.randint(0, VOCAB, (n, T), generator=g)
        labels = ids.clone()
        labels[torch.rand(n, T, generator=g) < 0.3] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def flat_parameters(model):
    """The model's parameters as one flat vector, and the map back to a parameter dict."""
    params = dict(model.named_parameters())
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat = torch.cat([params[n].detach().flatten() for n in names])

    def unflatten(vec):
        return dict(zip(names, (c.view(s) for c, s in zip(torch.split(vec, sizes), shapes))))

    return flat, unflatten


def dense_reference(model, batches):
    """Dense float64 Hessian of the mean of the model's own loss over all label tokens (each
    batch weighted by its shifted label tokens), by torch.func on the math attention kernel:
    reverse over reverse (``torch.func.hessian``, forward over reverse through a vmapped
    jacobian, disagrees with plain autograd by 0.2 % on this model under torch 2.13, while
    jacrev(grad), jvp(grad) and double backward agree to 1e-8)."""
    flat, unflatten = flat_parameters(model)
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    total = sum(counts)

    def loss(vec):
        return sum(torch.func.functional_call(model, unflatten(vec), (), b).loss * (n / total)
                   for b, n in zip(batches, counts))

    with sdpa_kernel([SDPBackend.MATH]):
        dense = torch.func.jacrev(torch.func.grad(loss))(flat)
    return (dense + dense.T) / 2


def rel_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def gpt2_case():
    model = tiny_gpt2()
    batches = lm_batches()
    return model, batches, dense_reference(model, batches)


def test_hf_gpt2_products_and_spectrum_match_dense_float64(gpt2_case):
    model, batches, dense = gpt2_case
    H = hl.Hessian(model, None, batches)
    assert H.dim == dense.shape[0]
    assert H.num_samples == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    V = torch.randn(3, H.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert rel_error(H.hvp(V), V @ dense) <= 1e-7
    exact = torch.linalg.eigvalsh(dense).flip(0)
    top = H.eigenvalues(k=3)
    assert torch.allclose(top.values, exact[:3], rtol=1e-6)
    trace = H.trace(rtol=0.01)
    assert abs(trace.value - float(dense.trace())) <= 0.05 * abs(float(dense.trace()))


def test_transformer_preset_q_k_v_blocks_are_dense_sub_blocks_of_the_fused_weight(gpt2_case):
    model, batches, dense = gpt2_case
    H = hl.Hessian(model, None, batches, layers="transformer")
    shapes = {n: p.shape for n, p in model.named_parameters()}
    for layer in range(2):
        for part in ("q", "k", "v"):
            name = f"transformer.h.{layer}.attn.{part}"
            pieces = H.layer_pieces[name]
            assert {p.param for p in pieces} == {f"transformer.h.{layer}.attn.c_attn.weight",
                                                 f"transformer.h.{layer}.attn.c_attn.bias"}
            idx = block_flat_indices(pieces, shapes)
            block = H.block(name)
            assert block.dim == len(idx) == 8 * 8 + 8
            assert rel_error(block.dense(), dense[idx][:, idx]) <= 1e-7
    # Layer traces of the preset add up to the full trace and each matches its dense block.
    full, layers = H.traces(rtol=0.005, max_hvp=400)
    assert abs(sum(r.value for r in layers.values()) - full.value) < 1e-8 * abs(full.value)


def dense_gauss_newton(model, batches):
    """``sum_b w_b J_b^T H_out,b J_b`` for the logits and the model's own loss on them."""
    flat, unflatten = flat_parameters(model)
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    G = torch.zeros(len(flat), len(flat), dtype=torch.float64)
    for b, n in zip(batches, counts):
        def logits(vec, b=b):
            return torch.func.functional_call(model, unflatten(vec), (),
                                              {"input_ids": b["input_ids"]}).logits

        with sdpa_kernel([SDPBackend.MATH]):
            z = logits(flat).detach()
            J = torch.func.jacrev(logits)(flat).reshape(z.numel(), -1)

        def loss_of_logits(flat_z, b=b, shape=z.shape):
            return model.loss_function(flat_z.view(shape), b["labels"], vocab_size=VOCAB)

        H_out = torch.func.hessian(loss_of_logits)(z.flatten())
        G += (n / sum(counts)) * J.T @ H_out @ J
    return G


def test_model_output_objects_work_with_gauss_newton(gpt2_case):
    model, batches, _ = gpt2_case
    G = hl.GaussNewton(model, None, batches)
    dense = dense_gauss_newton(model, batches)
    V = torch.randn(2, G.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert rel_error(G.hvp(V), V @ dense) <= 1e-7
    assert rel_error(G.hvp(V[0]), dense @ V[0]) <= 1e-7  # the cached-graph single path


def float64_lm_loss(outputs, batch):
    """The causal LM loss in float64 (transformers' own loss upcasts the logits to float32
    only, which caps a float64 model's own loss at float32 precision)."""
    logits = outputs.logits[:, :-1].reshape(-1, VOCAB)
    return torch.nn.functional.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1))


def label_tokens(batch):
    return int((batch["labels"][:, 1:] != -100).sum())


def test_finite_difference_path_matches_exact_products_in_float64(gpt2_case):
    model, batches, dense = gpt2_case
    H = hl.Hessian(model, float64_lm_loss, batches, path="fd", num_terms=label_tokens)
    H_exact = hl.Hessian(model, float64_lm_loss, batches, path="reverse",
                         num_terms=label_tokens)
    V = torch.randn(2, H.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = H_exact.hvp(V)
    assert rel_error(exact, V @ dense) <= 1e-7  # the same matrix as the model's own loss
    rel = (H.hvp(V) - exact).norm(dim=1) / exact.norm(dim=1)
    assert (rel <= 1e-6).all(), rel
    top = H.eigenvalues(k=3)
    assert torch.allclose(top.values, H_exact.eigenvalues(k=3).values, rtol=1e-6)


def test_finite_difference_path_in_float32_reaches_1e_3_on_the_top_eigenvalues(gpt2_case):
    model, batches, dense = gpt2_case
    H32 = hl.Hessian(model.float(), None, batches, path="fd")
    model.double()
    exact = torch.linalg.eigvalsh(dense).flip(0)[:3]
    got = H32.eigenvalues(k=3).values.double()
    assert ((got - exact).abs() / exact.abs()).max() <= 1e-3


def test_default_attention_without_second_derivatives_is_handled():
    """PyTorch's default SDPA (flash attention on CPU) has no double backward; the engine runs
    products on the math kernel, and a plain double backward still fails outside it."""
    model = tiny_gpt2().float()
    batch = lm_batches((2,))[0]
    params = list(model.parameters())
    loss = model(**batch).loss
    g = torch.autograd.grad(loss, params, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(g, params, [torch.ones_like(p) for p in params])
    H = hl.Hessian(model, None, [batch], path="reverse")
    assert torch.isfinite(H.hvp(torch.ones(H.dim))).all()


def test_train_mode_gpt2_as_it_comes_is_measured_without_dropout():
    model = tiny_gpt2().train()
    batches = lm_batches()
    with pytest.warns(UserWarning, match="dropout off"):
        H = hl.Hessian(model, None, batches)
    H_eval = hl.Hessian(tiny_gpt2().eval(), None, batches)
    V = torch.randn(2, H.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.allclose(H.hvp(V), H_eval.hvp(V), atol=1e-12)


def test_sum_reduced_loss_is_refused_by_name():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    data = [(torch.randn(5, 4), torch.randint(0, 3, (5,))), (torch.randn(3, 4),
                                                            torch.randint(0, 3, (3,)))]
    with pytest.raises(HesslensInputError, match="reduction='sum'"):
        hl.Hessian(model, torch.nn.CrossEntropyLoss(reduction="sum"), data)
    with pytest.raises(HesslensInputError, match="sum of its terms"):
        hl.Hessian(model, lambda o, y: torch.nn.functional.cross_entropy(o, y, reduction="sum"),
                   data)
    hl.Hessian(model, torch.nn.CrossEntropyLoss(), data)


def test_mapping_batches_with_a_loss_function_and_a_term_counter():
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, features, scale, y=None):  # the whole mapping comes as keywords
            return self.lin(features) * scale

    model = Net().double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    pairs = [(x[:4], y[:4]), (x[4:], y[4:])]
    dicts = [{"features": x[:4], "scale": torch.ones(4, 1, dtype=torch.float64), "y": y[:4]},
             {"features": x[4:], "scale": torch.ones(3, 1, dtype=torch.float64), "y": y[4:]}]

    def loss_fn(out, batch):
        return torch.nn.functional.cross_entropy(out, batch["y"])

    H_dict = hl.Hessian(model, loss_fn, dicts)
    H_pair = hl.Hessian(model.lin, torch.nn.functional.cross_entropy, pairs)
    assert H_dict.num_samples == 7
    assert torch.allclose(H_dict.dense(), H_pair.dense(), atol=1e-12)
    # A term counter that weights the batches equally gives another (equal-weight) matrix.
    H_equal = hl.Hessian(model, loss_fn, dicts, num_terms=lambda batch: 1)
    assert not torch.allclose(H_equal.dense(), H_pair.dense(), atol=1e-6)


def test_shuffling_loader_is_a_named_error():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    dataset = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    with pytest.raises(DataChangedError, match="shuffle=False"):
        # caught on the second pass: at construction (its first-batch check) or at latest on
        # the estimator's first pass
        H = hl.Hessian(model, torch.nn.functional.cross_entropy, loader, reuse_graph=False)
        H.trace(method="exact")
    fixed = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=False)
    H = hl.Hessian(model, torch.nn.functional.cross_entropy, fixed, reuse_graph=False)
    assert H.trace(method="exact").value > 0


def test_nan_curvature_with_a_finite_loss_is_a_named_error():
    from hesslens.errors import NonFiniteCurvatureError

    class SqrtNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return (x * self.w.abs().sqrt()).sum(dim=1)  # finite at w = 0, curvature is not

    data = (torch.randn(4, 3), torch.randn(4))
    H = hl.Hessian(SqrtNet(), torch.nn.functional.mse_loss, data, path="reverse")
    with pytest.raises(NonFiniteCurvatureError, match="not finite"):
        H.hvp(torch.ones(3))


def test_hvp_refuses_integer_vectors_and_block_refuses_non_names(gpt2_case):
    model, batches, _ = gpt2_case
    H = hl.Hessian(model, None, batches)
    with pytest.raises(HesslensInputError, match="floating-point"):
        H.hvp(torch.ones(H.dim, dtype=torch.int64))
    with pytest.raises(HesslensInputError, match="layer name"):
        H.block(0)


def _relu_mlp_case(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 3)).to(dtype)
    data = (torch.randn(64, 6, dtype=dtype), torch.randint(0, 3, (64,)))
    V = torch.randn(4, sum(p.numel() for p in model.parameters()),
                    generator=torch.Generator().manual_seed(0), dtype=dtype)
    return model, data, V


def test_finite_differences_on_a_relu_network_in_float64_fall_back_to_a_small_step():
    """Across ReLU kinks the weight-scaled step does not settle; the sqrt(eps) step of plain
    central differences crosses almost none in float64, so the products match the exact ones."""
    import warnings

    model, data, V = _relu_mlp_case(torch.float64)
    exact = hl.Hessian(model, torch.nn.functional.cross_entropy, data).hvp(V)
    H = hl.Hessian(model, torch.nn.functional.cross_entropy, data, path="fd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fd = H.hvp(V)
    rel = (fd - exact).norm(dim=1) / exact.norm(dim=1)
    assert (rel <= 1e-6).all(), rel


def test_finite_differences_on_a_relu_network_in_float32_say_they_did_not_settle():
    """In float32 no step both crosses few kinks and beats rounding: D(h) and D(h/2) keep
    disagreeing, and the fd path says so by name instead of returning products silently."""
    import warnings

    model, data, V = _relu_mlp_case(torch.float32)
    H = hl.Hessian(model, torch.nn.functional.cross_entropy, data, path="fd")
    with pytest.warns(UserWarning, match="did not settle"):
        H.hvp(V)
    torch.manual_seed(0)
    smooth = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.Tanh(),
                                 torch.nn.Linear(64, 3)).double()
    data64 = (data[0].double(), data[1])
    H = hl.Hessian(smooth, torch.nn.functional.cross_entropy, data64, path="fd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        H.hvp(V[:, :H.dim].double())


def test_finite_differences_that_did_not_settle_stop_searching(monkeypatch):
    """After a search for a step that settles has failed (float32 ReLU network), later products
    keep the step found and cost four gradients each instead of searching again."""
    import hesslens.curvature.products as products

    model, data, V = _relu_mlp_case(torch.float32)
    H = hl.Hessian(model, torch.nn.functional.cross_entropy, data, path="fd")
    with pytest.warns(UserWarning, match="did not settle"):
        H.hvp(V[:1])
    calls = []
    original = products.gradient

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(products, "gradient", counting)
    H.hvp(V[1:])
    assert len(calls) == 4 * 3


# --------------------------------------------------------------------------- T5 and DistilBERT
def tiny_t5():
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        d_model=16, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=8,
        vocab_size=VOCAB, decoder_start_token_id=0, pad_token_id=0)).double().eval()


def tiny_distilbert():
    """Weights of std 0.5: the default 0.02 leaves the attention's curvature near 1e-7."""
    torch.manual_seed(0)
    return DistilBertForSequenceClassification(DistilBertConfig(
        dim=16, hidden_dim=32, n_layers=1, n_heads=2, vocab_size=VOCAB,
        max_position_embeddings=T, num_labels=3, initializer_range=0.5)).double().eval()


def seq2seq_batches(seed: int = 0):
    """Uneven batches with decoder labels (some masked with -100); the model builds the decoder
    inputs from the labels, and its own loss averages over the label tokens (no shift)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (3, 2):
        labels = torch.randint(1, VOCAB, (n, 4), generator=g)
        labels[torch.rand(n, 4, generator=g) < 0.3] = -100
        out.append({"input_ids": torch.randint(1, VOCAB, (n, T), generator=g), "labels": labels})
    return out, [int((b["labels"] != -100).sum()) for b in out]


def classification_batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = [{"input_ids": torch.randint(1, VOCAB, (n, T), generator=g),
            "labels": torch.randint(0, 3, (n,), generator=g)} for n in (3, 2)]
    return out, [3, 2]


def dense_sub_block(model, batches, counts, names):
    """The dense float64 sub-block of the Hessian of the model's own loss (each batch weighted
    by its terms) at the parameters ``names``, each flattened row-major, in that order: the
    Hessian in those parameters with every other one held, reverse over reverse on the math
    attention kernel, as ``dense_reference``."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [params[n].numel() for n in names]

    def loss(sub):
        values = dict(params)
        for name, chunk in zip(names, torch.split(sub, sizes)):
            values[name] = chunk.view(params[name].shape)
        return sum(torch.func.functional_call(model, values, (), b).loss * (n / sum(counts))
                   for b, n in zip(batches, counts))

    with sdpa_kernel([SDPBackend.MATH]):
        dense = torch.func.jacrev(torch.func.grad(loss))(
            torch.cat([params[n].reshape(-1) for n in names]))
    return (dense + dense.T) / 2


T5_SELF = "encoder.block.0.layer.0.SelfAttention"
T5_CROSS = "decoder.block.0.layer.1.EncDecAttention"
DISTILBERT_ATTN = "distilbert.transformer.layer.0.attention"
SPLIT_CASES = {  # model, batches, {block: the parameters it must hold}
    "t5": (tiny_t5, seq2seq_batches, {
        "encoder.block.0.attn.q": [f"{T5_SELF}.q.weight"],
        f"{T5_CROSS}.o": [f"{T5_CROSS}.o.weight"],
        "decoder.block.0.attn.k": ["decoder.block.0.layer.0.SelfAttention.k.weight"]}),
    "distilbert": (tiny_distilbert, classification_batches, {
        "distilbert.transformer.layer.0.attn.q": [f"{DISTILBERT_ATTN}.q_lin.weight",
                                                  f"{DISTILBERT_ATTN}.q_lin.bias"],
        "distilbert.transformer.layer.0.attn.o": [f"{DISTILBERT_ATTN}.out_lin.weight",
                                                  f"{DISTILBERT_ATTN}.out_lin.bias"]}),
}


@pytest.mark.parametrize("family", list(SPLIT_CASES))
def test_transformer_preset_on_t5_and_distilbert_matches_dense_sub_blocks(family):
    build, make_batches, expected = SPLIT_CASES[family]
    model = build()
    batches, counts = make_batches()
    H = hl.Hessian(model, None, batches, layers="transformer")
    assert H.num_samples == sum(counts)
    # the blocks partition every trainable element, tied weights (T5's shared embedding) once
    shapes = {n: p.shape for n, p in model.named_parameters()}
    claimed = torch.cat([block_flat_indices(pieces, shapes) for pieces in H.layer_pieces.values()])
    assert torch.equal(claimed.sort().values, torch.arange(H.dim))
    names = list(H.layer_pieces)
    attentions = [n[:-2] for n in names if n.endswith(".q")]
    assert len(attentions) == (3 if family == "t5" else 1)  # T5: encoder, decoder, cross
    for prefix in attentions:
        assert all(f"{prefix}.{role}" in names for role in "kvo")
    for block, params in expected.items():
        assert [(p.param, p.dim) for p in H.layer_pieces[block]] == [(n, None) for n in params]
        dense = dense_sub_block(model, batches, counts, params)
        exact = torch.linalg.eigvalsh(dense)
        assert exact.abs().max() > 1e-2  # a block the loss depends on
        assert rel_error(H.block(block).dense(), dense) <= 1e-9
        top = H.block(block).eigenvalues(k=1).values
        assert torch.allclose(top, exact[-1:], rtol=1e-6, atol=0), (top, exact[-1])
