"""Tests of the zoo's Hugging Face transformers (gpt-nano, vit-tiny), its token tasks (modadd,
seqcopy) and the helpers that give each model its batches and loss."""

from __future__ import annotations

import functools
import hashlib
import socket
import subprocess
import sys

import pytest
import torch
import transformers
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.loss.loss_utils import ForCausalLMLoss

from hesslens.errors import HesslensInputError
from hesslens.zoo import (
    DATASETS,
    IGNORE_INDEX,
    TokenDataset,
    answer_classes,
    build_model,
    dataset_info,
    load_dataset,
    modadd,
    model_batches,
    model_input,
    model_loss,
    seqcopy,
    token_subset,
)

# sha256 of the registered modadd's (x_train, y_train, x_test, y_test) bytes, seed 0: pins the
# split (numpy's PCG64 permutation) so that a change to it cannot pass unnoticed
MODADD_SHA256 = "1b816d321e661ec96e895065ee6ff300004eab71d97c183006f34aeed7f70831"


@functools.cache
def _modadd() -> TokenDataset:
    return load_dataset("modadd")


@functools.cache
def _digits():
    return load_dataset("digits")


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_gpt_nano_builds_offline_from_config_with_default_attention(monkeypatch):
    _no_network(monkeypatch)
    ds = _modadd()
    model = build_model("gpt-nano", ds.input_shape, ds.num_classes, seed=0)
    assert isinstance(model, transformers.GPT2LMHeadModel)
    assert model.config.vocab_size == 24 and model.config.n_positions == 4
    assert model.config._attn_implementation == "sdpa"
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, as in GPT-2
    assert model.config.activation_function == "gelu"
    assert sum(p.numel() for p in model.parameters()) == 26368
    bigger = build_model("gpt-nano", (4,), 24, n_layer=3, n_embd=48, n_head=4)
    assert len(bigger.transformer.h) == 3 and bigger.config.n_embd == 48


def test_vit_tiny_builds_offline_for_digits_and_mnist1d_shapes(monkeypatch):
    _no_network(monkeypatch)
    model = build_model("vit-tiny", (1, 8, 8), 10, seed=0)
    assert isinstance(model, transformers.ViTForImageClassification)
    assert model.config._attn_implementation == "sdpa"
    assert model.vit.embeddings.patch_embeddings.num_patches == 16
    coarse = build_model("vit-tiny", (1, 8, 8), 10, patch_size=4)
    assert coarse.vit.embeddings.patch_embeddings.num_patches == 4
    signal = build_model("vit-tiny", (1, 40), 10)
    assert signal.config.image_size == (1, 40) and signal.config.patch_size == (1, 4)
    assert signal.vit.embeddings.patch_embeddings.num_patches == 10


@pytest.mark.parametrize(("name", "shape", "classes"), [("gpt-nano", (4,), 24),
                                                         ("vit-tiny", (1, 8, 8), 10)])
def test_same_seed_same_weights_and_global_state_kept(name, shape, classes):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = build_model(name, shape, classes, seed=0), build_model(name, shape, classes, seed=0)
    c = build_model(name, shape, classes, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize(("name", "shape", "classes"), [("gpt-nano", (4,), 24),
                                                         ("vit-tiny", (1, 8, 8), 10)])
def test_dropout_is_off_so_train_mode_forward_is_deterministic(name, shape, classes):
    model = build_model(name, shape, classes, seed=0)
    assert model.training  # built like the other zoo models: train mode, nothing random in it
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
    rates = [getattr(m, a) for m in model.modules() for a in ("dropout", "attention_dropout")
             if isinstance(getattr(m, a, None), float)]
    assert all(r == 0.0 for r in rates)
    gen = torch.Generator().manual_seed(0)
    if name == "gpt-nano":
        batch = {"input_ids": torch.randint(0, classes, (6, *shape), generator=gen)}
    else:
        batch = {"pixel_values": torch.randn(6, *shape, generator=gen)}
    first, second = model(**batch).logits, model(**batch).logits
    assert torch.equal(first, second)
    torch.testing.assert_close(model.eval()(**batch).logits, first, rtol=0, atol=1e-6)


def _answer_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the label tokens, the logits at t - 1 predicting the label at t."""
    terms, count = logits.new_zeros(()), 0
    for i, t in (labels[:, 1:] != IGNORE_INDEX).nonzero().tolist():
        terms = terms + nn.functional.cross_entropy(logits[i, t], labels[i, t + 1])
        count += 1
    return terms / count


def test_gpt_nano_own_loss_is_the_mean_over_modadd_answers():
    ds = _modadd()
    model = build_model("gpt-nano", ds.input_shape, ds.num_classes, seed=0)
    (batch,) = model_batches(model, ds.x_train[:40], ds.y_train[:40], batch_size=40)
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.logits.shape == (40, 4, 24)
    answers = nn.functional.cross_entropy(out.logits[:, 2], ds.y_train[:40, 3])
    torch.testing.assert_close(out.loss, answers, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss, _answer_token_loss(out.logits, batch["labels"]))


def test_gpt_nano_own_loss_weights_tokens_not_sequences():
    ds = seqcopy(seed=0)
    model = build_model("gpt-nano", ds.input_shape, ds.num_classes, seed=0)
    x, y = ds.x_train[:8], ds.y_train[:8].clone()
    y[0, 6:] = IGNORE_INDEX  # sequence 0 keeps 1 label token, the others 4
    with torch.no_grad():
        out = model(input_ids=x, labels=y)
    token_mean = _answer_token_loss(out.logits, y)
    torch.testing.assert_close(out.loss, token_mean, rtol=1e-6, atol=0)
    per_sequence = torch.stack([_answer_token_loss(out.logits[i : i + 1], y[i : i + 1])
                                for i in range(8)])
    assert abs(float(per_sequence.mean() - token_mean)) > 1e-4  # the two weightings differ here


def test_gpt_nano_own_loss_is_hugging_face_s_and_keeps_float64():
    ds = _modadd()
    model = build_model("gpt-nano", ds.input_shape, ds.num_classes, seed=0)
    x, y = ds.x_train[:30], ds.y_train[:30]
    with torch.no_grad():
        out = model(input_ids=x, labels=y)
        hf = ForCausalLMLoss(out.logits, y, vocab_size=24)
        torch.testing.assert_close(out.loss, hf, rtol=1e-6, atol=0)
        items = torch.tensor(7)  # transformers.Trainer's gradient-accumulation form
        torch.testing.assert_close(
            model(input_ids=x, labels=y, num_items_in_batch=items).loss,
            ForCausalLMLoss(out.logits, y, vocab_size=24, num_items_in_batch=items),
            rtol=1e-6, atol=0,
        )
        model64 = model.to(torch.float64)
        out64 = model64(input_ids=x, labels=y)
    assert out64.loss.dtype == torch.float64  # Hugging Face's own would be float32
    ref = nn.functional.cross_entropy(out64.logits[:, 2], y[:, 3])
    torch.testing.assert_close(out64.loss, ref, rtol=1e-13, atol=0)
    assert abs(float(out64.loss) - float(out.loss)) < 1e-5


def test_vit_tiny_takes_digits_images_and_its_loss_is_the_batch_cross_entropy():
    ds = _digits()
    model = build_model("vit-tiny", ds.input_shape, ds.num_classes, seed=0)
    data = model_batches("vit-tiny", ds.x_train[:50], ds.y_train[:50], batch_size=32)
    assert [tuple(b["pixel_values"].shape) for b in data] == [(32, 1, 8, 8), (18, 1, 8, 8)]
    for batch in data:
        out = model(**batch)
        assert out.logits.shape == (len(batch["labels"]), 10)
        torch.testing.assert_close(
            out.loss, nn.functional.cross_entropy(out.logits, batch["labels"]), rtol=1e-6, atol=0
        )


def test_vit_tiny_takes_mnist1d_signals_as_height_one_images():
    model = build_model("vit-tiny", (1, 40), 10, seed=0)
    x, y = torch.randn(5, 1, 40, generator=torch.Generator().manual_seed(0)), torch.arange(5)
    (batch,) = model_batches(model, x, y)
    assert batch["pixel_values"].shape == (5, 1, 1, 40)
    assert torch.equal(batch["pixel_values"][:, :, 0], x)
    out = model(**batch)
    assert out.logits.shape == (5, 10) and torch.isfinite(out.loss)


def test_modadd_is_modular_addition_with_labels_only_at_the_answer():
    ds = _modadd()
    assert isinstance(ds, TokenDataset) and ds.input_shape == (4,) and ds.vocab_size == 24
    assert (len(ds.x_train), len(ds.x_test)) == (264, 265)
    for x, y in (ds.train, ds.test):
        assert x.dtype == y.dtype == torch.int64
        a, b, eq, c = x.unbind(1)
        assert torch.equal(c, (a + b) % 23) and bool((eq == 23).all())
        assert bool((y[:, :3] == IGNORE_INDEX).all()) and torch.equal(y[:, 3], c)
    pairs = torch.cat([ds.x_train[:, :2], ds.x_test[:, :2]])
    assert len({tuple(p) for p in pairs.tolist()}) == 23 * 23  # every pair once: disjoint split


def _digest(ds: TokenDataset) -> str:
    h = hashlib.sha256()
    for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def test_modadd_split_is_deterministic_and_seeded():
    first, again = load_dataset("modadd"), load_dataset("modadd", seed=0)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert _digest(first) == _digest(modadd(seed=0))
    other = load_dataset("modadd", seed=1)
    assert not torch.equal(other.x_train, first.x_train)
    assert _digest(other) != _digest(first)


def test_modadd_split_is_pinned():
    assert _digest(_modadd()) == MODADD_SHA256


def test_seqcopy_copies_distinct_words_after_the_separator():
    ds = load_dataset("seqcopy")
    assert ds.input_shape == (9,) and ds.vocab_size == 9
    assert (len(ds.x_train), len(ds.x_test)) == (1024, 512)
    words = torch.cat([ds.x_train, ds.x_test])[:, :4]
    assert len({tuple(w) for w in words.tolist()}) == 1536
    for x, y in (ds.train, ds.test):
        assert torch.equal(x[:, 5:], x[:, :4]) and bool((x[:, 4] == 8).all())
        assert bool((y[:, :5] == IGNORE_INDEX).all()) and torch.equal(y[:, 5:], x[:, :4])


def test_tasks_are_registered_with_their_shapes():
    for name, shape, vocab in (("modadd", (4,), 24), ("seqcopy", (9,), 9)):
        info = dataset_info(name)
        assert name in DATASETS and info.builtin
        assert (info.input_shape, info.num_classes) == (shape, vocab)
        ds = load_dataset(name)
        assert (ds.input_shape, ds.num_classes) == (shape, vocab)


def test_token_subset_takes_per_class_sequences_of_each_answer():
    ds = _modadd()
    x, y = token_subset(*ds.train, per_class=5, seed=0)
    assert torch.bincount(answer_classes(y), minlength=23).tolist() == [5] * 23
    again = token_subset(*ds.train, per_class=5, seed=0)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    assert not torch.equal(token_subset(*ds.train, per_class=5, seed=1)[0], x)


def test_token_dataset_train_val_split_is_disjoint():
    train, (x_val, y_val) = _modadd().train_val_split(0.25, seed=0)
    assert isinstance(train, TokenDataset) and len(train.x_train) + len(x_val) == 264
    assert torch.equal(y_val[:, 3], x_val[:, 3])  # labels stay with their sequences
    seen = {tuple(r) for r in train.x_train.tolist()}
    assert not seen & {tuple(r) for r in x_val.tolist()}


def test_model_batches_give_each_model_its_batches_in_order():
    ds = _modadd()
    data = model_batches("gpt-nano", ds.x_train, ds.y_train, batch_size=100)
    assert [len(b["input_ids"]) for b in data] == [100, 100, 64]
    assert torch.equal(torch.cat([b["input_ids"] for b in data]), ds.x_train)
    assert torch.equal(torch.cat([b["labels"] for b in data]), ds.y_train)
    x, y = _digits().train
    pairs = model_batches("lenet", x[:10], y[:10], batch_size=4)
    assert [len(b[1]) for b in pairs] == [4, 4, 2] and isinstance(pairs[0], tuple)
    assert len(model_batches("mlp", x[:10], y[:10])) == 1
    assert (model_input("gpt-nano"), model_input("vit-tiny"), model_input("resnet18")) == (
        "input_ids", "pixel_values", None)
    assert model_input(build_model("gpt-nano", (4,), 24)) == "input_ids"
    assert model_input(build_model("mlp", (1, 40), 10)) is None
    assert model_loss("gpt-nano") is None and model_loss("vit-tiny") is None
    assert model_loss("lenet") is nn.functional.cross_entropy


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: model_batches("lenet", *_modadd().train), "token task.*gpt-nano"),
        (lambda: model_batches("gpt-nano", *_digits().train), "int64 tensor of shape"),
        (lambda: model_batches(build_model("gpt-nano", (3,), 24), *_modadd().train),
         r"4 tokens, but the model has 3 positions"),
        (lambda: model_batches(build_model("gpt-nano", (4,), 10), *_modadd().train),
         r"outside the vocabulary \[0, 10\)"),
        (lambda: model_batches("gpt-nano", *_modadd().train, batch_size=0), "batch_size"),
        (lambda: model_batches("alexnet", *_digits().train), "unknown model"),
        (lambda: model_loss(3), "zoo model name or a torch.nn.Module"),
        (lambda: build_model("gpt-nano", (1, 8, 8), 10), "gpt-nano: input_shape must be 1-D"),
        (lambda: build_model("gpt-nano", (4,), 24, n_embd=30, n_head=4), "not divisible"),
        (lambda: build_model("vit-tiny", (4,), 10), "vit-tiny: input_shape must be 2-D or 3-D"),
        (lambda: build_model("vit-tiny", (1, 8, 8), 10, patch_size=3), "do not tile"),
        (lambda: build_model("vit-tiny", (1, 8, 8), 10, dropout=0.1), "does not take"),
        (lambda: modadd(p=1), "p >= 2"),
        (lambda: modadd(train_fraction=1.0), "train_fraction"),
        (lambda: seqcopy(length=2, symbols=3, n_train=8, n_test=2), "only 3\\*\\*2 = 9"),
        (lambda: TokenDataset("bad", torch.zeros(2, 3, dtype=torch.long),
                              torch.full((2, 3), IGNORE_INDEX), torch.zeros(1, 3, dtype=torch.long),
                              torch.zeros(1, 3, dtype=torch.long), (3,), 2),
         "no label other than -100"),
    ],
)
def test_bad_input_raises_input_error(call, match):
    with pytest.raises(HesslensInputError, match=match):
        call()


def test_missing_transformers_is_a_clear_input_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    for name, shape in (("gpt-nano", (4,)), ("vit-tiny", (1, 8, 8))):
        with pytest.raises(HesslensInputError, match=r'pip install "hesslens\[hf\]"'):
            build_model(name, shape, 10)


def test_hesslens_imports_and_loads_tasks_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import hesslens, hesslens.zoo as zoo\n"
        "ds = zoo.load_dataset('modadd')\n"
        "batches = zoo.model_batches('gpt-nano', *ds.train, batch_size=64)\n"
        "zoo.build_model('mlp', (1, 40), 10)\n"
        "print(len(batches), 'transformers' in sys.modules and sys.modules['transformers'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["5", "None"]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", ["gpt-nano", "vit-tiny"])
def test_torch_func_hvp_of_the_own_loss_matches_double_backward(name):
    """Forward-over-reverse products of the model's own loss through functional_call (tied
    weights included) agree with double backward, with the math attention kernel."""
    gen = torch.Generator().manual_seed(0)
    if name == "gpt-nano":
        model = build_model(name, (4,), 24, n_embd=16, seed=0)
        batch = model_batches(model, *token_subset(*_modadd().train, per_class=1, seed=0))[0]
    else:
        model = build_model(name, (1, 8, 8), 10, hidden_size=16, seed=0)
        batch = model_batches(model, _digits().x_train[:12], _digits().y_train[:12])[0]
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        return functional_call(model, p, (), batch).loss

    vs = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(2)]
    stacked = {k: torch.stack([v[k] for v in vs]) for k in params}
    with sdpa_kernel(SDPBackend.MATH):
        hvps = vmap(lambda v: jvp(grad(loss), (params,), (v,))[1])(stacked)
        ps = [p.detach().requires_grad_() for p in params.values()]
        g = torch.autograd.grad(loss(dict(zip(params, ps))), ps, create_graph=True)
        for i, v in enumerate(vs):
            ref = torch.autograd.grad(g, ps, grad_outputs=list(v.values()), retain_graph=True)
            for k, r in zip(params, ref):
                torch.testing.assert_close(hvps[k][i], r, rtol=1e-4, atol=1e-5)
            assert any(float(r.abs().max()) > 1e-3 for r in ref)  # a product that is not 0
