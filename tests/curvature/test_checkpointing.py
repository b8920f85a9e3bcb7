"""Models that checkpoint activations (torch.utils.checkpoint, Hugging Face
gradient_checkpointing_enable): every product path against dense float64 references, the
checkpointed modules really rerun in backward, and named errors where a path cannot run."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import cross_entropy
from torch.utils.checkpoint import checkpoint
from transformers import GPT2Config, GPT2LMHeadModel

import hesslens as hl
from hesslens.training.penalty import HessianTracePenalty
from tests.reference import dense_gauss_newton, dense_hessian


class Counter:
    """A call counter that the operators' private copies share with the model."""

    def __init__(self):
        self.n = 0

    def __deepcopy__(self, memo):
        return self


class Block(nn.Module):
    """A layer that counts its forward passes (the first and every rerun)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.calls = Counter()

    def forward(self, h):
        self.calls.n += 1
        return torch.tanh(self.lin(h))


class Net(nn.Module):
    """Linear -> Block (checkpointed unless ``reentrant`` is None) -> Linear."""

    def __init__(self, reentrant):
        super().__init__()
        self.inp, self.block, self.out = nn.Linear(4, 6), Block(), nn.Linear(6, 3)
        self.reentrant = reentrant

    def forward(self, x):
        h = torch.tanh(self.inp(x))  # the checkpoint's input requires grad
        if self.reentrant is None:
            return self.out(self.block(h))
        return self.out(checkpoint(self.block, h, use_reentrant=self.reentrant))


def nets(reentrant=False):
    """A checkpointed network and its twin without checkpointing (the same weights)."""
    torch.manual_seed(0)
    twin = Net(None).double()
    net = Net(reentrant).double()
    net.load_state_dict(twin.state_dict())
    return net, twin


def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, 4, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (n,), generator=g)) for n in (7, 5)]


def rel_error(a, b):
    return float((a - b).norm() / b.norm())


def vectors(dim, k=3, seed=1):
    return torch.randn(k, dim, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


@pytest.fixture(scope="module")
def dense():
    _, twin = nets()
    names = [n for n, _ in twin.named_parameters()]
    return (dense_hessian(twin, cross_entropy, data(), names),
            dense_gauss_newton(twin, cross_entropy, data(), names))


@pytest.mark.parametrize("path", ["reverse", "auto", "fd"])
def test_hessian_products_through_checkpointing_match_dense(dense, path):
    net, _ = nets()
    H = hl.Hessian(net, cross_entropy, data(), path=path)
    V = vectors(H.dim, k=5)
    tol = 1e-7 if path == "fd" else 1e-12
    assert rel_error(H.hvp(V), V @ dense[0]) <= tol
    assert rel_error(H.hvp(V[0]), dense[0] @ V[0]) <= tol
    if path == "auto":  # forward over reverse cannot run through the checkpoint: not kept
        assert "forward" not in H.path_choice.timings.get("batched", {})


def test_gauss_newton_residual_and_fisher_through_checkpointing_match_dense(dense):
    net, twin = nets()
    H = hl.Hessian(net, cross_entropy, data())
    V = vectors(H.dim)
    H_dense, G_dense = dense
    for M, expected in ((H.gauss_newton(), V @ G_dense), (H.residual(), V @ (H_dense - G_dense))):
        assert rel_error(M.hvp(V), expected) <= 1e-12
        assert rel_error(M.hvp(V[0]), expected[0]) <= 1e-12
    grads = []  # the empirical Fisher from per-sample gradients of the twin
    for x, y in data():
        for n in range(len(y)):
            loss = cross_entropy(twin(x[n:n + 1]), y[n:n + 1])
            grads.append(torch.cat([g.flatten() for g in
                                    torch.autograd.grad(loss, list(twin.parameters()))]))
    grads = torch.stack(grads)
    F_dense = grads.T @ grads / len(grads)
    assert rel_error(H.empirical_fisher().hvp(V), V @ F_dense) <= 1e-12


def test_checkpointed_module_reruns_during_products():
    """The checkpoint is in effect: the block runs again in backward (and again in double
    backward), where its twin runs once per graph."""
    net, twin = nets()
    counts = []
    for model in (net, twin):
        H = hl.Hessian(model, cross_entropy, data(), path="reverse")
        before = model.block.calls.n
        H.hvp(vectors(H.dim, k=2))
        counts.append(model.block.calls.n - before)
    assert counts[1] == 2  # one forward per batch's kept graph
    assert counts[0] >= 2 * counts[1]


def test_forward_path_through_checkpointing_is_a_named_error():
    net, _ = nets()
    H = hl.Hessian(net, cross_entropy, data(), path="forward")
    with pytest.raises(hl.HesslensInputError, match="path='reverse'"):
        H.hvp(vectors(H.dim))


@pytest.mark.parametrize("matrix", ["reverse", "fd", "forward", "gauss_newton", "fisher"])
def test_reentrant_checkpointing_is_a_named_error(matrix):
    net, _ = nets(reentrant=True)
    path = matrix if matrix in ("reverse", "fd", "forward") else "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own warnings about reentrant checkpoints
        H = hl.Hessian(net, cross_entropy, data(), path=path)
        M = {"gauss_newton": H.gauss_newton, "fisher": H.empirical_fisher}.get(
            matrix, lambda: H)()
        match = "path='reverse'" if matrix == "forward" else "use_reentrant=False"
        with pytest.raises(hl.HesslensInputError, match=match):
            M.hvp(vectors(H.dim, k=2))


def test_hessian_penalty_through_checkpointing_matches_dense_and_its_twin(dense):
    net, twin = nets()
    x, y = data()[0]
    probes = [[torch.randn(p.shape, generator=torch.Generator().manual_seed(i),
                           dtype=torch.float64) for p in net.parameters()] for i in range(2)]
    values, grads = [], []
    for model in (net, twin):
        pen = HessianTracePenalty(model, layers="all", n_probes=2, seed=0)
        value = pen(cross_entropy(model(x), y), probes=probes)
        values.append(value.detach())
        grads.append(torch.cat([g.flatten() for g in
                                torch.autograd.grad(value, list(model.parameters()))]))
    names = [n for n, _ in twin.named_parameters()]
    H_first = dense_hessian(twin, cross_entropy, [(x, y)], names)
    flat = [torch.cat([t.flatten() for t in probe]) for probe in probes]
    expected = sum(float(f @ H_first @ f) for f in flat) / 2
    assert abs(float(values[0]) - expected) <= 1e-12 * abs(expected)
    assert rel_error(grads[0], grads[1]) <= 1e-12 and grads[1].norm() > 0


def test_hessian_penalty_through_reentrant_checkpointing_is_a_named_error():
    net, _ = nets(reentrant=True)
    x, y = data()[0]
    pen = HessianTracePenalty(net, layers="all", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(hl.HesslensInputError, match="use_reentrant=False"):
            pen(cross_entropy(net(x), y))


# --------------------------------------------------------------------------- Hugging Face
VOCAB, T = 11, 6


def hf_gpt2(checkpointing=None, dropout=0.1):
    """A tiny GPT-2 in train mode (dropout on unless 0): with Hugging Face checkpointing
    (``checkpointing`` the use_reentrant it asks for), or none."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(
        n_layer=2, n_embd=8, n_head=2, vocab_size=VOCAB, n_positions=T, bos_token_id=0,
        eos_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout,
        attn_pdrop=dropout)).double().train()
    if checkpointing is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated alias in transformers 5
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    return model


def lm_batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (3, 2):
        ids = torch.randint(0, VOCAB, (n, T), generator=g)
        labels = ids.clone()
        labels[torch.rand(n, T, generator=g) < 0.3] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def counted(model):
    """Count the calls of the first layer's attention (reruns in backward included); the
    counter travels with the operators' private copies."""
    calls = [0]
    model.transformer.h[0].attn.register_forward_hook(
        lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_gradient_checkpointing_stays_in_effect_in_the_eval_copy(reentrant):
    """With dropout on, the operators analyse an eval-mode copy, where transformers would stop
    checkpointing: the user's checkpointing stays in effect there (non-reentrant, so that a
    use_reentrant=True model works too), and the products are those of the same model
    without checkpointing."""
    model, twin = hf_gpt2(checkpointing=reentrant), hf_gpt2().eval()
    calls, twin_calls = counted(model), counted(twin)
    data = lm_batches()
    with pytest.warns(UserWarning, match="dropout off"):
        H = hl.Hessian(model, None, data, path="reverse")
    H_twin = hl.Hessian(twin, None, data, path="reverse")
    V = vectors(H.dim, k=2)
    before, twin_before = calls[0], twin_calls[0]
    got, expected = H.hvp(V), H_twin.hvp(V)
    assert rel_error(got, expected) <= 1e-12
    assert twin_calls[0] - twin_before == 2  # one forward per batch
    assert calls[0] - before >= 2 * (twin_calls[0] - twin_before)  # and reruns in backward
    for part in ("gauss_newton", "residual", "empirical_fisher"):
        M, M_twin = getattr(H, part)(), getattr(H_twin, part)()
        assert rel_error(M.hvp(V), M_twin.hvp(V)) <= 1e-12, part
        assert rel_error(M.hvp(V[0]), M_twin.hvp(V[0])) <= 1e-12, part
    with pytest.warns(UserWarning, match="dropout off"):
        fd = hl.Hessian(model, None, data, path="fd", fd_order=2)
    assert rel_error(fd.hvp(V), hl.Hessian(twin, None, data, path="fd", fd_order=2).hvp(V)
                     ) <= 1e-10
    with pytest.warns(UserWarning, match="dropout off"):
        forward = hl.Hessian(model, None, data, path="forward")
    with pytest.raises(hl.HesslensInputError, match="path='reverse'"):
        forward.hvp(V)


def test_hf_checkpointed_block_matches_its_dense_sub_block():
    """The fused attention weight's block of a checkpointed GPT-2 against the dense float64
    Hessian of the model's loss in that weight (the twin without checkpointing, reverse over
    reverse on the math kernel)."""
    model, twin = hf_gpt2(checkpointing=False, dropout=0.0), hf_gpt2(dropout=0.0).eval()
    data = lm_batches()
    name = "transformer.h.0.attn.c_attn.weight"
    H = hl.Hessian(model, None, data, layers={"qkv": [name]}, path="reverse")
    params = {n: p.detach() for n, p in twin.named_parameters()}
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in data]

    def loss(w):
        values = {**params, name: w}
        total = 0
        for batch, n in zip(data, counts):
            logits = torch.func.functional_call(twin, values, (),
                                                {"input_ids": batch["input_ids"]}).logits
            total = total + n / sum(counts) * cross_entropy(
                logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1))
        return total

    with sdpa_kernel([SDPBackend.MATH]):
        dense = torch.func.jacrev(torch.func.grad(loss))(params[name]).reshape(
            params[name].numel(), -1)
    assert rel_error(H.block("qkv").dense(), dense) <= 1e-10


def lm_loss(outputs, labels):
    logits = outputs.logits
    return cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))


@pytest.mark.parametrize("method", ["hvp", "fd"])
def test_hessian_penalty_on_a_checkpointing_hf_model_equals_its_twin(method):
    """The training penalty on the user's own model (train mode, checkpointing in effect in
    the training pass): the same value and gradient as without checkpointing. GPT-2's
    LayerNorm makes the penalty re-evaluate the loss with differentiable normalisation; that
    side pass runs without checkpointing (a rerun in backward would leave its modes)."""
    model, twin = hf_gpt2(checkpointing=False, dropout=0.0), hf_gpt2(dropout=0.0)
    calls, twin_calls = counted(model), counted(twin)
    batch = lm_batches()[0]
    ids, labels = batch["input_ids"], batch["labels"]
    probes = [[torch.randn(p.shape, generator=torch.Generator().manual_seed(i),
                           dtype=torch.float64) for p in model.parameters()] for i in range(2)]
    values, grads, runs = [], [], []
    for m, c in ((model, calls), (twin, twin_calls)):
        pen = HessianTracePenalty(m, layers="all", n_probes=2, seed=0, loss_fn=lm_loss,
                                  method=method)
        loss = lm_loss(m(ids), labels)
        start = c[0]
        value = pen(loss, inputs=ids, targets=labels, probes=probes)
        values.append(float(value))
        total = loss + value
        grads.append(torch.cat([g.flatten() for g in
                                torch.autograd.grad(total, list(m.parameters()))]))
        runs.append(c[0] - start)
    assert abs(values[0] - values[1]) <= 1e-12 * abs(values[1])
    assert rel_error(grads[0], grads[1]) <= 1e-10
    # the training pass reran its checkpointed layers in the backward above
    assert runs[0] > runs[1]
