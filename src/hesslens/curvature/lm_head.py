"""A causal language model's own loss with its output layer in token chunks.

Every product through the LM head and cross-entropy would otherwise hold several
``(batch x tokens x vocabulary)`` tensors (logits, softmax, their copies in the graph for double
backward): 0.8 GB each for GPT-2 at 8 x 512 tokens in float32. Here the loss is taken from the
hidden states ``h`` the head receives, ``L = s sum_t CE(W h_t + b, y_t)`` (``s`` = 1 / the label
tokens: shifted by one, -100 ignored, exactly the model's recipe), and every derivative of it
is computed a chunk of tokens at a time, with the chunk's logits recomputed each time and never
kept:

* the gradient ``(dh, dW, db) = s (r W, r^T h, sum r)``, ``r = softmax(z) - onehot(y)``
  (:class:`_HeadGrad`, the backward of :class:`_HeadLoss`), keeping only ``h`` in the graph;
* its derivative along ``(u, V, c)`` (double backward, forward mode, the Gauss-Newton part):
  with ``e = W u + V h + c`` and ``q = p * e - p (p . e)`` (the softmax Hessian times ``e``),
  ``s (q W + r V, q^T h + r^T u, sum q)``; the Gauss-Newton matrix ``J^T H_z J`` keeps the ``q``
  terms only (:func:`head_gauss_newton`), the empirical Fisher uses ``r (r . e)`` per sample.

A chunk holds about :data:`CHUNK_COPIES` ``(tokens x vocabulary)`` tensors; its tokens come
from one byte budget, ``token_chunk_bytes`` (default :data:`TOKEN_CHUNK_BYTES`).

:class:`ChunkedLMLoss` decides where this recipe is the model's own: a Hugging Face causal LM
(``...ForCausalLM``, ``...LMHeadModel``) whose ``loss_function`` is transformers'
``ForCausalLMLoss`` (or the zoo's ``causal_lm_loss``), a linear output embedding, no logit
soft-capping or scaling after the head, mapping batches with ``labels``; it checks the chunked
loss against the model's own on the first batch, and everything else keeps the model's own
loss. Logits below float32 are upcast as transformers does; float64 stays float64
(transformers rounds the logits to float32).

Example:
    >>> import torch
    >>> h, W = torch.randn(6, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    >>> y = torch.tensor([1, 2, 3, 0, 8, 5])
    >>> chunked = head_loss(h, W, None, y, 1 / 6, chunk=2)
    >>> plain = torch.nn.functional.cross_entropy(h @ W.T, y)
    >>> bool(torch.isclose(chunked, plain))
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hesslens.curvature.products import saved_bytes, second_order_kernels
from hesslens.errors import HesslensInputError

#: Default byte budget of one token chunk's ``(tokens x vocabulary)`` temporaries.
TOKEN_CHUNK_BYTES = 256 * 2**20

#: How many ``(tokens x vocabulary)`` tensors of the computing dtype one chunk holds at most
#: (logits, probabilities, ``e``, ``q``, ``r`` and one temporary).
CHUNK_COPIES = 6

IGNORE_INDEX = -100

#: The loss functions whose recipe this module computes: transformers' own, and
#: :func:`hesslens.zoo.hf_models.causal_lm_loss` (the same, float64 kept).
PLAIN_LOSSES = ("ForCausalLMLoss", "causal_lm_loss")

#: Config attributes of models that change the logits after the head (soft-capping, scaling):
#: their loss is not the plain recipe.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                    "lm_head_multiplier", "output_logit_scale")

#: Batch keys that change how transformers computes the loss: such batches keep the model's own.
LOSS_KEYS = ("num_items_in_batch", "shift_labels", "ignore_index", "logits_to_keep")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss is computed in: float32 for half precision (as transformers upcasts
    the logits), the model's dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def tokens_per_chunk(vocab: int, dtype: torch.dtype, budget: int) -> int:
    """Tokens per chunk so that one chunk's temporaries fit in ``budget`` bytes.

    Example:
        >>> tokens_per_chunk(50257, torch.float32, 256 * 2**20)
        222
    """
    per_token = CHUNK_COPIES * vocab * torch.finfo(compute_dtype(dtype)).bits // 8
    return max(1, int(budget) // per_token)


# ---------------------------------------------------------------------- the chunk formulas
def _logits(h: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    """A chunk's logits in the computing dtype (the head's matmul in the model's dtype)."""
    return F.linear(h, W, b).to(compute_dtype(h.dtype))


def _residual(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``p = softmax(z)`` and ``r = p - onehot(y)`` (no one-hot tensor made)."""
    p = torch.softmax(z, dim=-1)
    rows = torch.arange(p.shape[-2], device=p.device)
    r = p.index_put((rows, y), p.new_full((), -1.0).expand(y.shape), accumulate=True)
    return p, r


def _direction(h: Tensor, u: Tensor | None, V: Tensor | None, c: Tensor | None,
               W: Tensor, dtype: torch.dtype) -> Tensor:
    """``e = W u + V h + c``: the change of a chunk's logits along ``(u, V, c)``."""
    e = None
    if u is not None:
        e = F.linear(u.to(dtype), W.to(dtype))
    if V is not None:
        hd, Vd = h.to(dtype), V.to(dtype)
        e = hd @ Vd.T if e is None else torch.addmm(e, hd, Vd.T)
    if c is not None:
        e = c.to(dtype).expand(h.shape[0], -1) if e is None else e + c.to(dtype)
    return e if e is not None else h.new_zeros(h.shape[0], W.shape[0], dtype=dtype)


def _softmax_hessian(p: Tensor, e: Tensor) -> Tensor:
    """``q = (diag(p) - p p^T) e`` row by row: the cross-entropy's Hessian in the logits."""
    pe = p * e
    return torch.addcmul(pe, p, pe.sum(-1, keepdim=True), value=-1.0)


def _add_product(acc: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """``acc + a @ b``: in place (no ``(vocabulary x hidden)`` temporary) unless a ``torch.func``
    transform batches the operands, which in-place updates of an unbatched ``acc`` cannot take."""
    if acc is None:
        return a @ b
    if _is_transformed(acc, a, b):
        return acc + a @ b
    return acc.addmm_(a, b)


def _is_transformed(*tensors: Tensor) -> bool:
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _chunks(n: int, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, n)) for i in range(0, n, max(1, chunk))]


def head_loss_sum(h: Tensor, W: Tensor, b: Tensor | None, y: Tensor, chunk: int) -> Tensor:
    """``sum_t CE(W h_t + b, y_t)`` in the computing dtype, a chunk at a time."""
    total = h.new_zeros((), dtype=compute_dtype(h.dtype))
    for rows in _chunks(h.shape[0], chunk):
        total = total + F.cross_entropy(_logits(h[rows], W, b), y[rows], reduction="sum")
    return total


def head_gradient(h: Tensor, W: Tensor, b: Tensor | None, y: Tensor, s: Tensor, chunk: int
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``s (r W, r^T h, sum_t r_t)``: the gradient of ``s sum_t CE`` in ``(h, W, b)``."""
    dtype = compute_dtype(h.dtype)
    Wc, s = W.to(dtype), s.to(dtype)
    dh, dW = [], None
    db = torch.zeros(W.shape[0], dtype=dtype, device=W.device) if b is not None else None
    for rows in _chunks(h.shape[0], chunk):
        _, r = _residual(_logits(h[rows], W, b), y[rows])
        # the scale goes on the (tokens x hidden) side: no scaled (tokens x vocabulary) copy
        dh.append((r @ Wc) * s)
        dW = _add_product(dW, r.T, h[rows].to(dtype) * s)
        if db is not None:
            db = db + r.sum(0) * s
    dh = torch.cat(dh) if dh else h.new_zeros(h.shape, dtype=dtype)
    dW = dW if dW is not None else torch.zeros_like(Wc)
    return dh.to(h.dtype), dW.to(W.dtype), db.to(b.dtype) if b is not None else None


def head_hessian_product(h: Tensor, W: Tensor, b: Tensor | None, y: Tensor, s: Tensor,
                         u: Tensor | None, V: Tensor | None, c: Tensor | None, chunk: int, *,
                         gauss_newton: bool = False
                         ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """The Hessian of ``s sum_t CE(W h_t + b, y_t)`` in ``(h, W, b)`` times ``(u, V, c)``:
    ``s (q W + r V, q^T h + r^T u, sum q)``, and ``sum_t r_t . e_t`` (the derivative of the
    gradient in ``s``). ``gauss_newton=True`` leaves out the ``r`` terms: ``J^T H_z J``."""
    dtype = compute_dtype(h.dtype)
    Wc, sc = W.to(dtype), s.to(dtype)
    out_h, out_W = [], None
    out_b = torch.zeros(W.shape[0], dtype=dtype, device=W.device) if b is not None else None
    along_s = h.new_zeros((), dtype=dtype)
    for rows in _chunks(h.shape[0], chunk):
        hc = h[rows].to(dtype)
        uc = u[rows] if u is not None else None
        p, r = _residual(_logits(h[rows], W, b), y[rows])
        e = _direction(hc, uc, V, c, W, dtype)
        q = _softmax_hessian(p, e)
        del p
        # the scale goes on the (tokens x hidden) side: no scaled (tokens x vocabulary) copy
        oh = q @ Wc
        out_W = _add_product(out_W, q.T, hc * sc)
        if out_b is not None:
            out_b = out_b + q.sum(0) * sc
        del q
        if not gauss_newton:
            along_s = along_s + (r * e).sum()
            if V is not None:
                oh = torch.addmm(oh, r, V.to(dtype))
            if uc is not None:
                out_W = _add_product(out_W, r.T, uc.to(dtype) * sc)
        out_h.append(oh * sc)
    oh = torch.cat(out_h) if out_h else h.new_zeros(h.shape, dtype=dtype)
    out_W = out_W if out_W is not None else torch.zeros_like(Wc)
    return (oh.to(h.dtype), out_W.to(W.dtype),
            out_b.to(b.dtype) if b is not None else None, along_s)


def head_gauss_newton(h: Tensor, W: Tensor, b: Tensor | None, y: Tensor, s: float,
                      u: Tensor | None, V: Tensor | None, c: Tensor | None, chunk: int
                      ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``J_head^T H_z J_head (u, V, c)``: the output-space part of the Gauss-Newton product,
    a chunk of tokens at a time (``z = W h + b`` the logits, ``H_z`` the loss's Hessian in
    them)."""
    scale = torch.as_tensor(s, dtype=compute_dtype(h.dtype), device=h.device)
    return head_hessian_product(h, W, b, y, scale, u, V, c, chunk, gauss_newton=True)[:3]


def head_fisher(h: Tensor, W: Tensor, b: Tensor | None, y: Tensor, sample: Tensor,
                sample_weight: Tensor, u: Tensor | None, V: Tensor | None, c: Tensor | None,
                chunk: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """The output-space part of the empirical Fisher product: ``J_head^T`` of
    ``c_t = w_n d_n (d_n . e)`` for the per-sample loss gradients ``d_n = a_n sum_{t in n} r_t``
    (``sample[t]`` the sample of token ``t``, ``sample_weight[n] = w_n a_n^2``), in two passes
    over the chunks: the sums ``d_n . e``, then ``J_head^T``."""
    dtype = compute_dtype(h.dtype)
    Wc = W.to(dtype)
    along = torch.zeros(sample_weight.shape[0], dtype=dtype, device=h.device)
    for rows in _chunks(h.shape[0], chunk):
        _, r = _residual(_logits(h[rows], W, b), y[rows])
        e = _direction(h[rows].to(dtype), u[rows] if u is not None else None, V, c, W, dtype)
        along = along.index_add(0, sample[rows], (r * e).sum(-1))
    coef = along * sample_weight.to(dtype)
    out_h, out_W = [], None
    out_b = torch.zeros(W.shape[0], dtype=dtype, device=W.device) if b is not None else None
    for rows in _chunks(h.shape[0], chunk):
        _, r = _residual(_logits(h[rows], W, b), y[rows])
        token_coef = coef[sample[rows]].unsqueeze(-1)  # on the (tokens x hidden) side
        out_h.append((r @ Wc) * token_coef)
        out_W = _add_product(out_W, r.T, h[rows].to(dtype) * token_coef)
        if out_b is not None:
            out_b = out_b + r.T @ token_coef[:, 0]
    oh = torch.cat(out_h) if out_h else h.new_zeros(h.shape, dtype=dtype)
    out_W = out_W if out_W is not None else torch.zeros_like(Wc)
    return oh.to(h.dtype), out_W.to(W.dtype), out_b.to(b.dtype) if b is not None else None


# ---------------------------------------------------------------------- autograd functions
class _HeadLoss(torch.autograd.Function):
    """``s sum_t CE(W h_t + b, y_t)`` whose graph keeps ``h`` only; its backward is
    :class:`_HeadGrad` (differentiable again, in chunks); forward mode and ``vmap`` work."""

    generate_vmap_rule = True

    @staticmethod
    def forward(h: Tensor, W: Tensor, b: Tensor | None, y: Tensor, s: float,
                chunk: int) -> Tensor:
        return head_loss_sum(h, W, b, y, chunk) * s

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        h, W, b, y, s, chunk = inputs
        ctx.save_for_backward(h, W, b, y)
        ctx.save_for_forward(h, W, b, y)
        ctx.s, ctx.chunk = s, chunk

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        h, W, b, y = ctx.saved_tensors
        dh, dW, db = _HeadGrad.apply(h, W, b, y, grad * ctx.s, ctx.chunk)
        return dh, dW, db, None, None, None

    @staticmethod
    def jvp(ctx: Any, th: Tensor | None, tW: Tensor | None, tb: Tensor | None, *_: Any
            ) -> Tensor:
        h, W, b, y = ctx.saved_tensors
        dtype = compute_dtype(h.dtype)
        total = h.new_zeros((), dtype=dtype)
        for rows in _chunks(h.shape[0], ctx.chunk):
            _, r = _residual(_logits(h[rows], W, b), y[rows])
            e = _direction(h[rows].to(dtype), th[rows] if th is not None else None, tW, tb,
                           W, dtype)
            total = total + (r * e).sum()
        return total * ctx.s


class _HeadGrad(torch.autograd.Function):
    """The gradient of ``s sum_t CE`` in ``(h, W, b)`` (``s`` a tensor: the incoming gradient
    times the mean's scale); its backward and forward mode are the chunked Hessian product."""

    generate_vmap_rule = True

    @staticmethod
    def forward(h: Tensor, W: Tensor, b: Tensor | None, y: Tensor, s: Tensor, chunk: int
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        return head_gradient(h, W, b, y, s, chunk)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        h, W, b, y, s, chunk = inputs
        ctx.save_for_backward(h, W, b, y, s)
        ctx.save_for_forward(h, W, b, y, s)
        ctx.chunk = chunk
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, ah: Tensor | None, aW: Tensor | None, ab: Tensor | None) -> tuple:
        h, W, b, y, s = ctx.saved_tensors
        # The Jacobian of the gradient is the (symmetric) Hessian: the backward is the product
        # with the incoming gradients.
        oh, oW, ob, along_s = head_hessian_product(h, W, b, y, s, ah, aW, ab, ctx.chunk)
        return oh, oW, ob, None, along_s.to(s.dtype).reshape(s.shape), None

    @staticmethod
    def jvp(ctx: Any, th: Tensor | None, tW: Tensor | None, tb: Tensor | None, _ty: Any,
            ts: Tensor | None, _tc: Any) -> tuple:
        h, W, b, y, s = ctx.saved_tensors
        oh, oW, ob, _ = head_hessian_product(h, W, b, y, s, th, tW, tb, ctx.chunk)
        if ts is not None:
            gh, gW, gb = head_gradient(h, W, b, y, ts, ctx.chunk)
            oh, oW = oh + gh, oW + gW
            ob = ob + gb if ob is not None else None
        return oh, oW, ob


def head_loss(h: Tensor, W: Tensor, b: Tensor | None, y: Tensor, s: float, chunk: int
              ) -> Tensor:
    """``s sum_t CE(W h_t + b, y_t)`` (``h``: ``(tokens, hidden)``, ``y``: ``(tokens,)`` with
    no ignored label) whose every derivative runs ``chunk`` tokens at a time."""
    return _HeadLoss.apply(h, W, b, y, s, chunk)


# ---------------------------------------------------------------------- the model's own loss
@dataclass
class HeadInputs:
    """What the output layer of one batch sees at its label tokens: the hidden states ``h``
    (``(tokens, hidden)``, with their graph), the head's weight and bias as the model used them,
    the labels, each token's sample (row) and the number of samples."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    labels: Tensor
    sample: Tensor
    samples: int


class ChunkedLMLoss:
    """A Hugging Face causal LM's own loss (next-token cross-entropy, mean over the label
    tokens) from the hidden states its output layer receives, that layer applied in chunks of
    tokens sized from ``token_chunk_bytes``."""

    def __init__(self, token_chunk_bytes: int = TOKEN_CHUNK_BYTES) -> None:
        if int(token_chunk_bytes) <= 0:
            raise HesslensInputError(
                f"token_chunk_bytes must be a positive number of bytes, not {token_chunk_bytes!r}"
                " (None: the model's own loss, unchunked)")
        self.token_chunk_bytes = int(token_chunk_bytes)

    @staticmethod
    def unsupported(model: nn.Module) -> str | None:
        """Why ``model``'s own loss is not the plain recipe this class computes, or ``None``."""
        name = type(model).__name__
        if not (name.endswith("ForCausalLM") or "LMHeadModel" in name):
            return f"{name} is not a causal language model"
        try:
            fn = model.loss_function
        except Exception:  # older transformers, or a model without one
            return f"{name} has no loss_function"
        if getattr(fn, "__name__", "") not in PLAIN_LOSSES:
            return f"{name}'s loss is {getattr(fn, '__name__', fn)!r}, not ForCausalLMLoss"
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if not isinstance(head, nn.Linear):
            return f"{name}'s output embedding is a {type(head).__name__}, not nn.Linear"
        config = getattr(model, "config", None)
        if head.out_features != getattr(config, "vocab_size", None):
            return f"{name}'s output layer has {head.out_features} rows, not config.vocab_size"
        for key in LOGIT_TRANSFORMS:
            value = getattr(config, key, None)
            if value is not None and not (value == 1 and "softcap" not in key):
                return f"{name} transforms its logits after the head ({key}={value})"
        return None

    @staticmethod
    def applies_to(batch: object) -> bool:
        """Whether ``batch`` is computed this way: a mapping with integer ``(batch, tokens)``
        labels and nothing that changes transformers' loss."""
        if not isinstance(batch, Mapping) or any(key in batch for key in LOSS_KEYS):
            return False
        labels = batch.get("labels")
        return (isinstance(labels, Tensor) and labels.dim() == 2 and labels.shape[1] >= 2
                and not labels.is_floating_point())

    def chunk(self, inputs: HeadInputs) -> int:
        """Tokens per chunk for these inputs."""
        return tokens_per_chunk(inputs.weight.shape[0], inputs.hidden.dtype,
                                self.token_chunk_bytes)

    def chunk_bytes(self, vocab: int, dtype: torch.dtype) -> int:
        """The bytes one chunk's temporaries take."""
        per_token = CHUNK_COPIES * vocab * torch.finfo(compute_dtype(dtype)).bits // 8
        return tokens_per_chunk(vocab, dtype, self.token_chunk_bytes) * per_token

    def inputs(self, model: Any, params: dict[str, Tensor], batch: Mapping) -> HeadInputs:
        """Run ``model`` (a :class:`~hesslens.curvature.functional_model.FunctionalModel`) with
        ``params`` on ``batch`` without its labels and its output layer replaced by a pass
        through: the hidden states, weight and bias that layer would have used."""
        head = model.module.get_output_embeddings()
        seen: dict[str, Any] = {}

        def capture(hidden: Tensor) -> Tensor:
            seen["inputs"] = (hidden, head.weight, head.bias)
            return hidden

        head.forward = capture
        try:
            model(params, (), {k: v for k, v in batch.items() if k != "labels"})
        finally:
            del head.forward
        if "inputs" not in seen:
            raise HesslensInputError(
                f"{type(model.module).__name__} did not call its output embedding: its loss "
                "cannot be chunked (pass token_chunk_bytes=None)")
        hidden, weight, bias = seen["inputs"]
        labels = batch["labels"].to(hidden.device)
        if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
            raise HesslensInputError(
                f"the output layer saw hidden states of shape {tuple(hidden.shape)} for labels "
                f"of shape {tuple(labels.shape)}: its loss cannot be chunked (pass "
                "token_chunk_bytes=None)")
        shifted = labels[:, 1:].reshape(-1)
        keep = (shifted != IGNORE_INDEX).nonzero()[:, 0]
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, keep)
        return HeadInputs(h, weight, bias, shifted.index_select(0, keep),
                          torch.div(keep, labels.shape[1] - 1, rounding_mode="floor"),
                          labels.shape[0])

    def loss(self, model: Any, params: dict[str, Tensor], batch: Mapping) -> Tensor:
        """The batch's mean loss over its label tokens (NaN without any, as transformers')."""
        x = self.inputs(model, params, batch)
        n = x.labels.numel()
        return head_loss(x.hidden, x.weight, x.bias, x.labels, 1.0 / n if n else float("nan"),
                         self.chunk(x))

    def check(self, model: Any, batch: Mapping, own: Tensor) -> str | None:
        """Compare the chunked loss of ``batch`` with the model's own value ``own``: ``None``
        when they agree, else what differs."""
        try:
            with torch.no_grad():
                value = self.loss(model, {}, batch)
        except Exception as err:  # any failure: the model's own loss is kept
            return f"the chunked loss failed ({type(err).__name__}: {str(err)[:200]})"
        a, b = float(value), float(own)
        if not abs(a - b) <= 1e-5 * max(abs(b), 1e-12):
            return f"the chunked loss {a:.8g} differs from the model's own {b:.8g}"
        return None


# ---------------------------------------------------------------------- Gauss-Newton and Fisher
ROLES = ("hidden", "weight", "bias")


@dataclass
class HeadGraph:
    """One batch's graph for Gauss-Newton and Fisher products through a chunked output layer:
    the leaves, the head's inputs that depend on them (``outs``, named by ``roles``: the hidden
    states, and the weight and bias where trainable), ``J^T u`` for dummy ``us`` (its
    derivative in ``us`` gives ``J v``), the head's inputs detached, and the chunk."""

    leaves: dict[str, Tensor]
    outs: list[Tensor]
    roles: list[str]
    us: list[Tensor]
    jt_u: dict[str, Tensor | None]
    inputs: HeadInputs
    chunk: int
    nbytes: int


def head_graph(head: ChunkedLMLoss, model: Any, params: dict[str, Tensor], names: list[str],
               batch: Mapping) -> HeadGraph:
    """The :class:`HeadGraph` of ``batch`` over the parameters ``names``."""
    leaves = {n: params[n].detach().requires_grad_(True) for n in names}
    with torch.enable_grad(), second_order_kernels(), saved_bytes(params.values()) as saved:
        x = head.inputs(model, leaves, batch)
        pairs = [(role, t) for role, t in zip(ROLES, (x.hidden, x.weight, x.bias))
                 if t is not None and t.requires_grad]
        outs = [t for _, t in pairs]
        us = [torch.zeros_like(t, requires_grad=True) for t in outs]
        jt_u = torch.autograd.grad(outs, list(leaves.values()), us, create_graph=True,
                                   allow_unused=True) if outs else [None] * len(leaves)
    detached = HeadInputs(x.hidden.detach(), x.weight.detach(),
                          x.bias.detach() if x.bias is not None else None, x.labels, x.sample,
                          x.samples)
    return HeadGraph(leaves, outs, [role for role, _ in pairs], us, dict(zip(leaves, jt_u)),
                     detached, head.chunk(x),
                     saved.nbytes + x.hidden.numel() * x.hidden.element_size())


def _jacobian_product(graph: HeadGraph, names: list[str], v: list[Tensor]
                      ) -> dict[str, Tensor] | None:
    """``J v`` at the head's inputs, by role (a role ``v`` does not reach is missing), or
    ``None`` when ``v`` reaches none: the derivative of ``J^T u . v`` in ``u``."""
    pairs = [(graph.jt_u[n], t) for n, t in zip(names, v)
             if graph.jt_u[n] is not None and graph.jt_u[n].requires_grad]
    if not pairs:
        return None
    jv = torch.autograd.grad([j for j, _ in pairs], graph.us, [t for _, t in pairs],
                             retain_graph=True, allow_unused=True)
    found = {role: t for role, t in zip(graph.roles, jv) if t is not None}
    return found or None


def _transpose_product(graph: HeadGraph, names: list[str], cotangents: dict[str, Tensor | None],
                       out: list[Tensor]) -> None:
    """Add ``J^T a`` (``a`` by role, at the head's inputs) into ``out``, one per name."""
    pairs = [(o, cotangents[role]) for o, role in zip(graph.outs, graph.roles)
             if cotangents.get(role) is not None]
    if not pairs:
        return
    grads = torch.autograd.grad([o for o, _ in pairs], [graph.leaves[n] for n in names],
                                [a for _, a in pairs], retain_graph=True, allow_unused=True)
    for o, g in zip(out, grads):
        if g is not None:
            o += g


def gauss_newton_rows(graph: HeadGraph, names: list[str], V: list[Tensor], scale: float,
                      out: list[Tensor]) -> list[Tensor]:
    """``G v = J^T H_z J v`` for each row of the ``(k, *shape)`` tensors ``V`` (one per name)
    through the kept graph, the output-space part a chunk of tokens at a time; ``scale``
    multiplies the batch's summed token losses (its weight over its label tokens). Added into
    ``out``."""
    x = graph.inputs
    with second_order_kernels():
        for j in range(V[0].shape[0]):
            jv = _jacobian_product(graph, names, [t[j] for t in V])
            if jv is None:
                continue
            ah, aW, ab = head_gauss_newton(x.hidden, x.weight, x.bias, x.labels, scale,
                                           jv.get("hidden"), jv.get("weight"), jv.get("bias"),
                                           graph.chunk)
            _transpose_product(graph, names, {"hidden": ah, "weight": aW, "bias": ab},
                               [o[j] for o in out])
    return out


def fisher_rows(graph: HeadGraph, names: list[str], V: list[Tensor], num_terms: int,
                out: list[Tensor]) -> list[Tensor]:
    """The empirical Fisher ``sum_n w_n g_n g_n^T`` times each row of ``V``: ``g_n`` the
    gradient of sample ``n``'s mean token loss, ``w_n`` its label tokens over ``num_terms``
    (all the data's). Added into ``out``."""
    x = graph.inputs
    tokens = torch.bincount(x.sample, minlength=x.samples).to(x.hidden.device)
    # w_n a_n^2 = (N_n / N) / N_n^2 for d_n = (1 / N_n) sum_t r_t
    weight = torch.where(tokens > 0, 1.0 / (num_terms * tokens.clamp(min=1).double()),
                         torch.zeros((), dtype=torch.float64, device=tokens.device))
    with second_order_kernels():
        for j in range(V[0].shape[0]):
            jv = _jacobian_product(graph, names, [t[j] for t in V])
            if jv is None:
                continue
            ah, aW, ab = head_fisher(x.hidden, x.weight, x.bias, x.labels, x.sample, weight,
                                     jv.get("hidden"), jv.get("weight"), jv.get("bias"),
                                     graph.chunk)
            _transpose_product(graph, names, {"hidden": ah, "weight": aW, "bias": ab},
                               [o[j] for o in out])
    return out
