"""How a batch becomes a loss: the model's call, the loss, the outputs Gauss-Newton needs, and
the number of loss terms a batch counts for.

* ``loss_fn(outputs, targets)`` for ``(inputs, targets)`` pairs: ``model(*inputs)``.
* ``loss_fn(outputs, batch)`` for mappings: ``model(**batch)``.
* ``loss_fn=None``: the model's own loss. The batch goes to the model whole (``model(**batch)``
  for a mapping, ``model(*batch)`` for a tuple, ``model(batch)`` for a tensor) and the loss is
  ``output.loss`` (Hugging Face ``ModelOutput``), ``output["loss"]``, or the output itself when
  it is a scalar.

A batch's weight is its number of loss terms: its batch size by default; for a Hugging Face
model's own loss on integer ``labels`` with a sequence dimension, its label tokens (labels that
are not -100; shifted by one for causal language models, which predict the next token).
``num_terms(batch)`` overrides both. A loss that is not a mean over its terms would be weighted
wrongly over several batches: a loss module with ``reduction="sum"`` is refused by name.

A Hugging Face causal LM's own loss is computed from the hidden states its output layer
receives, that layer and the cross-entropy applied a chunk of tokens at a time, so that no
``(batch x tokens x vocabulary)`` tensor is held whole (:mod:`hesslens.curvature.lm_head`;
``token_chunk_bytes`` sizes a chunk, ``None`` keeps the model's own loss). Where the model's
loss is not the plain recipe, or the chunked loss differs from it on the first batch, the
model's own loss is used.

Example:
    >>> import torch
    >>> spec = BatchLoss(torch.nn.Linear(2, 3), torch.nn.functional.cross_entropy)
    >>> spec.terms((torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)))
    4
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from hesslens.curvature.data import Batch, as_args, is_pair, leading_size
from hesslens.curvature.lm_head import TOKEN_CHUNK_BYTES, ChunkedLMLoss
from hesslens.errors import CurvatureUnderflowError, HesslensInputError

LossFn = Callable[[Any, Any], torch.Tensor]

IGNORE_INDEX = -100


class BatchLoss:
    """The loss of one batch for a model, a loss function (or the model's own loss) and a
    loss-term counter; a causal LM's own loss through a chunked output layer where it can be
    (``token_chunk_bytes``: the bytes of one chunk; ``None``: never)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | None,
                 num_terms: Callable[[Batch], int] | None = None, *,
                 token_chunk_bytes: int | None = TOKEN_CHUNK_BYTES) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise HesslensInputError(
                "loss_fn must be callable as loss_fn(outputs, targets), or None for the model's "
                "own loss")
        reduction = getattr(loss_fn, "reduction", None)
        if reduction is not None and reduction != "mean":
            raise HesslensInputError(
                f"loss_fn has reduction={reduction!r}: the curvature of several batches is that "
                "of the mean loss, and a batch's loss must be a mean over its terms. Use "
                "reduction='mean'")
        if num_terms is not None and not callable(num_terms):
            raise HesslensInputError("num_terms must be callable as num_terms(batch) -> int")
        self.loss_fn = loss_fn
        self.own_loss = loss_fn is None
        self._num_terms = num_terms
        self._causal = _is_causal_lm(model)
        self._hf_loss = _hf_loss_of_logits(model) if self.own_loss else None
        self._rebuild: Callable[[torch.Tensor], Any] | None = None  # logits -> outputs' form
        self.lm_head: ChunkedLMLoss | None = None
        #: why the model's own loss is not chunked (``None`` when it is)
        self.unchunked_reason: str | None = "a loss_fn was given"
        if self.own_loss:
            if token_chunk_bytes is None:
                self.unchunked_reason = "token_chunk_bytes=None"
            else:
                head = ChunkedLMLoss(token_chunk_bytes)
                self.unchunked_reason = head.unsupported(model)
                self.lm_head = head if self.unchunked_reason is None else None
        self._vocab = model.get_output_embeddings().out_features if self.lm_head else 0

    # ----------------------------------------------------------------- the model's call
    def call(self, forward: Callable[..., Any], batch: Batch) -> Any:
        """``forward(*args, **kwargs)`` with the arguments this batch gives the model."""
        if isinstance(batch, Mapping):
            return forward(**batch)
        if self.own_loss:
            if isinstance(batch, torch.Tensor):
                return forward(batch)
            return forward(*batch)
        if is_pair(batch):
            return forward(*as_args(batch[0]))
        return forward(batch)

    def batch_loss(self, model: Any, params: dict[str, torch.Tensor], batch: Batch
                   ) -> torch.Tensor:
        """The batch's (mean) loss for ``model`` (a
        :class:`~hesslens.curvature.functional_model.FunctionalModel`) with ``params``
        overriding its snapshot: through the chunked output layer where it applies."""
        head = self.chunked(batch)
        if head is not None:
            return head.loss(model, params, batch)
        return self.loss(self.call(model.bind(params), batch), batch)

    def chunked(self, batch: Batch) -> ChunkedLMLoss | None:
        """The chunked output layer ``batch``'s loss runs through, or ``None``."""
        if self.lm_head is not None and self.lm_head.applies_to(batch):
            return self.lm_head
        return None

    def chunk_bytes(self, dtype: torch.dtype) -> int:
        """The bytes of one token chunk of the chunked output layer for a model in ``dtype``
        (0 without one)."""
        if self.lm_head is None:
            return 0
        return self.lm_head.chunk_bytes(self._vocab, dtype)

    def check_chunked(self, model: Any, batch: Batch, own: torch.Tensor) -> None:
        """On the first batch: keep the chunked output layer only where its loss is the
        model's own value ``own`` (else warn and use the model's own loss)."""
        if self.chunked(batch) is None:
            return
        problem = self.lm_head.check(model, batch, own)
        if problem is not None:
            self.lm_head, self.unchunked_reason = None, problem
            warnings.warn(
                f"{problem}: the model's own loss is used, unchunked (every product through "
                "the output layer then holds (batch x tokens x vocabulary) tensors)",
                stacklevel=4)

    def loss(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """The batch's (mean) loss from the model's ``outputs``."""
        if self.own_loss:
            return model_loss(outputs)
        targets = batch[1] if is_pair(batch) else batch
        return self.loss_fn(outputs, targets)

    # ----------------------------------------------------------------- Gauss-Newton
    def output_tensor(self, outputs: Any) -> torch.Tensor:
        """The network outputs a Gauss-Newton matrix is taken through (``.logits`` of a
        ``ModelOutput`` or of a mapping); remembers the outputs' form, so that
        :meth:`loss_of_outputs` hands ``loss_fn`` outputs of the same form."""
        if isinstance(outputs, torch.Tensor):
            return outputs
        self._rebuild = _rebuilder(outputs)
        logits = getattr(outputs, "logits", None)
        if logits is None and isinstance(outputs, Mapping):
            logits = outputs.get("logits")
        if not isinstance(logits, torch.Tensor):
            raise HesslensInputError(
                f"the model returns a {type(outputs).__name__} with no tensor 'logits': the "
                "Gauss-Newton matrix needs the network's output tensor; wrap the model so it "
                "returns it")
        return logits

    def loss_of_outputs(self, z: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The loss as a function of the output tensor ``z`` (for ``d2 loss / d z2``)."""
        if not self.own_loss:
            targets = batch[1] if is_pair(batch) else batch
            if self._rebuild is None:
                return self.loss_fn(z, targets)
            try:
                return self.loss_fn(self._rebuild(z), targets)
            except (KeyError, AttributeError, TypeError) as err:
                raise HesslensInputError(
                    "the Gauss-Newton matrix takes the loss as a function of the logits alone: "
                    "loss_fn is given the model's outputs with only 'logits' in them, and "
                    f"failed on that ({type(err).__name__}: {err}); use a loss_fn that reads "
                    "only the logits") from err
        if self._hf_loss is None or not isinstance(batch, Mapping) or "labels" not in batch:
            raise HesslensInputError(
                "the Gauss-Newton matrix of the model's own loss needs that loss as a function "
                "of the logits, which is known for Hugging Face models called with 'labels' "
                "only: pass loss_fn(outputs, batch)")
        return self._hf_loss(z, batch["labels"])

    # ----------------------------------------------------------------- weights
    def terms(self, batch: Batch) -> int:
        """How many loss terms the batch's loss averages over."""
        if self._num_terms is not None:
            return self._num_terms(batch)
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if (self.own_loss and isinstance(labels, torch.Tensor) and labels.dim() >= 2
                and not labels.is_floating_point()):
            if self._causal:
                labels = labels[..., 1:]
            return int((labels != IGNORE_INDEX).sum())
        return leading_size(batch)


def _rebuilder(outputs: Any) -> Callable[[torch.Tensor], Any]:
    """``z -> outputs`` of the same form as ``outputs`` (a mapping or a ``ModelOutput``) with
    ``z`` as their only entry, ``logits``."""
    kind = type(outputs)
    if isinstance(outputs, dict) and kind is not dict:  # a ModelOutput: keyword construction
        return lambda z: kind(logits=z)
    return lambda z: {"logits": z}


def model_loss(outputs: Any) -> torch.Tensor:
    """The loss a model returned: ``outputs.loss``, ``outputs["loss"]`` or a scalar output."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if loss is None:
        raise HesslensInputError(
            f"loss_fn is None but the model returned a {type(outputs).__name__} without a loss: "
            "pass batches with the labels the model needs (e.g. a 'labels' key), or a loss_fn")
    return loss


def check_loss(loss: object) -> None:
    """Raise a clear error unless ``loss`` is a finite scalar tensor."""
    if not isinstance(loss, torch.Tensor):
        raise HesslensInputError(
            f"the loss is a {type(loss).__name__}, not a tensor: loss_fn must return the mean "
            "loss of the batch as a scalar tensor"
        )
    if loss.numel() != 1:
        raise HesslensInputError(
            f"the loss is a tensor of shape {tuple(loss.shape)}, not a scalar: use a mean "
            "reduction (e.g. reduction='mean')"
        )
    if not torch.isfinite(loss.detach()).all():
        raise HesslensInputError(
            f"the loss is not finite ({float(loss.detach()):g}): check the inputs, the targets "
            "and the model's weights"
        )
    value = abs(float(loss.detach()))
    if loss.is_floating_point() and 0.0 < value < torch.finfo(loss.dtype).tiny:
        raise CurvatureUnderflowError(
            f"the loss ({value:.3g}) is below the normal range of "
            f"{str(loss.dtype).removeprefix('torch.')} (smallest normal "
            f"{torch.finfo(loss.dtype).tiny:.3g}): it and its derivatives have lost their "
            "precision (subnormal numbers). Rescale the loss, or analyse a float64 copy "
            "(dtype=torch.float64)")


def _is_causal_lm(model: nn.Module) -> bool:
    name = type(model).__name__
    return name.endswith("ForCausalLM") or "LMHeadModel" in name


def _hf_loss_of_logits(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], Any] | None:
    """A Hugging Face model's own loss as a function of (logits, labels), when it has one."""
    try:
        fn = model.loss_function  # transformers >= 4.46
    except Exception:
        return None
    if not callable(fn):
        return None
    config = getattr(model, "config", None)
    try:
        first = next(iter(inspect.signature(fn).parameters))
    except (TypeError, ValueError, StopIteration):
        return None
    if first == "logits":
        vocab = getattr(config, "vocab_size", None)
        return lambda z, labels: fn(z, labels, vocab_size=vocab)
    if first == "labels":
        return lambda z, labels: fn(labels, z, config)
    return None
