"""A causal LM's own loss with its output layer in token chunks (hesslens.curvature.lm_head):
every product equal to the unchunked one in float64, on a tied (GPT-2) and an untied (Llama)
head, with several chunks a batch, and no (batch x tokens x vocabulary) tensor made."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import hesslens as hl
from hesslens.curvature.lm_head import CHUNK_COPIES, tokens_per_chunk

VOCAB, T = 64, 8
#: four float64 tokens a chunk: each batch (up to 21 label tokens) spans several chunks
CHUNK_BYTES = 4 * CHUNK_COPIES * VOCAB * 8


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(
        n_layer=2, n_embd=8, n_head=2, vocab_size=VOCAB, n_positions=T, bos_token_id=0,
        eos_token_id=0)).double().eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=T,
        tie_word_embeddings=False)).double().eval()


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


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


def float64_lm_loss(outputs, batch):
    """The causal LM loss in float64, unchunked (transformers' own rounds the logits to
    float32)."""
    logits = getattr(outputs, "logits", outputs)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB),
                                             batch["labels"][:, 1:].reshape(-1))


def label_tokens(batch):
    return int((batch["labels"][:, 1:] != -100).sum())


def rel_error(a, b):
    return float((a - b).norm() / b.norm())


def chunked(model, data, **options):
    H = hl.Hessian(model, None, data, token_chunk_bytes=CHUNK_BYTES, **options)
    assert H._shared.loop.loss.lm_head is not None, H._shared.loop.loss.unchunked_reason
    return H


def unchunked(model, data, **options):
    return hl.Hessian(model, float64_lm_loss, data, num_terms=label_tokens, **options)


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    model = MODELS[request.param]()
    data = lm_batches()
    dim = sum(p.numel() for p in model.parameters())
    V = torch.randn(3, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return model, data, V


def test_batches_span_several_chunks():
    tokens = min(label_tokens(b) for b in lm_batches())
    assert tokens_per_chunk(VOCAB, torch.float64, CHUNK_BYTES) == 4 < tokens


def test_chunked_loss_and_gradient_equal_the_unchunked(case):
    model, data, _ = case
    loss, grad = chunked(model, data).loss_and_gradient()
    loss_ref, grad_ref = unchunked(model, data).loss_and_gradient()
    assert abs(loss - loss_ref) <= 1e-13 * abs(loss_ref)
    assert rel_error(grad, grad_ref) <= 1e-12


@pytest.mark.parametrize("path", ["reverse", "forward"])
def test_hessian_products_equal_the_unchunked(case, path):
    """Each path against the unchunked products of the same path (on the Llama model torch
    2.13's forward over reverse differs from double backward by 5e-8, chunked or not)."""
    model, data, V = case
    H, ref = chunked(model, data, path=path), unchunked(model, data, path=path)
    expected = ref.hvp(V)
    assert rel_error(H.hvp(V), expected) <= 1e-10
    assert rel_error(H.hvp(V[0]), expected[0]) <= 1e-10


def test_finite_difference_products_equal_the_unchunked(case):
    """The same differences of gradients that agree to rounding: at a fixed step (order 2) to
    1e-10; with the fourth-order step search to its own rounding (the search settles on steps
    whose rounding reaches 3e-9 on GPT-2; Llama's RMSNorm computes in float32)."""
    model, data, V = case
    H = chunked(model, data, path="fd", fd_order=2)
    ref = unchunked(model, data, path="fd", fd_order=2)
    assert rel_error(H.hvp(V), ref.hvp(V)) <= 1e-10
    H, ref = chunked(model, data, path="fd"), unchunked(model, data, path="fd")
    assert rel_error(H.hvp(V), ref.hvp(V)) <= 1e-7


def test_gauss_newton_residual_and_fisher_equal_the_unchunked(case):
    model, data, V = case
    H, ref = chunked(model, data), unchunked(model, data)
    for part in ("gauss_newton", "residual", "empirical_fisher"):
        got, expected = getattr(H, part)(), getattr(ref, part)()
        assert rel_error(got.hvp(V), expected.hvp(V)) <= 1e-10, part
        assert rel_error(got.hvp(V[1]), expected.hvp(V[1])) <= 1e-10, part
    assert rel_error(hl.GaussNewton(model, None, data, token_chunk_bytes=CHUNK_BYTES).hvp(V),
                     ref.gauss_newton().hvp(V)) <= 1e-10


def test_gauss_newton_and_fisher_blocks_equal_the_unchunked(case):
    """A block's product differentiates its own parameters only, through the same graphs."""
    model, data, V = case
    H, ref = chunked(model, data), unchunked(model, data)
    layer = H.layers[1]
    for part in ("gauss_newton", "empirical_fisher"):
        got, expected = getattr(H, part)().block(layer), getattr(ref, part)().block(layer)
        W = V[:, :got.dim]
        assert rel_error(got.hvp(W), expected.hvp(W)) <= 1e-10, part


def test_top_eigenvalue_equals_the_unchunked(case):
    model, data, _ = case
    top = chunked(model, data).eigenvalues(k=2).values
    expected = unchunked(model, data).eigenvalues(k=2).values
    assert torch.allclose(top, expected, rtol=1e-10, atol=0)


class LargestVocabularyTensor(TorchDispatchMode):
    """The most elements of any tensor an operation allocates whose last dimension is the
    vocabulary (views, such as the weight's transpose expanded over vectors, allocate none)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == VOCAB:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("matrix", ["hessian", "hessian_forward", "gauss_newton",
                                    "empirical_fisher"])
def test_no_batch_by_tokens_by_vocabulary_tensor_is_made(matrix):
    """Every tensor of vocabulary width the products make holds one chunk of tokens (per
    vector in flight), where the unchunked products make the whole batch's logits."""
    model = tiny_gpt2()
    data = lm_batches((3,))
    whole = 3 * (T - 1) * VOCAB
    chunk = tokens_per_chunk(VOCAB, torch.float64, CHUNK_BYTES) * VOCAB
    V = torch.randn(2, sum(p.numel() for p in model.parameters()),
                    generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for H, bound in ((chunked(model, data, path="forward" if matrix.endswith("forward")
                              else "reverse"), 2 * chunk),
                     (unchunked(model, data), None)):
        M = {"gauss_newton": H.gauss_newton, "empirical_fisher": H.empirical_fisher}.get(
            matrix, lambda H=H: H)()
        with LargestVocabularyTensor() as seen:
            M.hvp(V)
        if bound is None:
            assert seen.largest >= whole  # the check can fail: unchunked products make them
        else:
            assert 0 < seen.largest <= bound < whole


def test_models_that_transform_their_logits_keep_their_own_loss():
    """Gemma-2 soft-caps its logits after the head (refused by name); a model that rescales
    them without saying so is caught on the first batch, with a warning."""
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=4,
        max_position_embeddings=T)).double().eval()
    H = hl.Hessian(gemma, None, lm_batches())
    assert H._shared.loop.loss.lm_head is None
    assert "final_logit_softcapping" in H._shared.loop.loss.unchunked_reason

    class RescaledLMHeadModel(GPT2LMHeadModel):
        def forward(self, input_ids=None, labels=None, **kwargs):
            logits = 2.0 * super().forward(input_ids=input_ids, **kwargs).logits
            loss = None if labels is None else self.loss_function(logits, labels, VOCAB)
            return type("Out", (), {"loss": loss, "logits": logits})()

    torch.manual_seed(0)
    model = RescaledLMHeadModel(tiny_gpt2().config).double().eval()
    data = lm_batches()
    with pytest.warns(UserWarning, match="differs from the model's own"):
        H = hl.Hessian(model, None, data, token_chunk_bytes=CHUNK_BYTES, path="reverse")
    assert H._shared.loop.loss.lm_head is None
    own = hl.Hessian(model, None, data, token_chunk_bytes=None, path="reverse")
    V = torch.randn(2, H.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(H.hvp(V), own.hvp(V))


def test_half_precision_model_is_chunked_with_its_own_loss_value():
    """bfloat16 logits are upcast to float32 as transformers does: the chunked loss is the
    model's own to float32 rounding."""
    model = tiny_gpt2().to(torch.bfloat16)
    data = lm_batches()
    H = hl.Hessian(model, None, data)
    assert H._shared.loop.loss.lm_head is not None
    own = hl.Hessian(model, None, data, token_chunk_bytes=None)
    (loss, grad), (loss_own, grad_own) = H.loss_and_gradient(), own.loss_and_gradient()
    assert abs(loss - loss_own) <= 1e-5 * abs(loss_own)
    assert rel_error(grad.double(), grad_own.double()) <= 2e-2


def test_token_chunk_bytes_must_be_positive():
    with pytest.raises(hl.HesslensInputError, match="token_chunk_bytes"):
        hl.Hessian(tiny_gpt2(), None, lm_batches(), token_chunk_bytes=0)
