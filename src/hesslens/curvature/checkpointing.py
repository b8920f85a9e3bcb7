"""Activation checkpointing (``torch.utils.checkpoint``) in the models the operators analyse.

A checkpointed module saves only its inputs and runs again during backward. Three things make
that work for curvature products:

* The private copy keeps the tensors of its last call in its modules
  (:meth:`hesslens.curvature.functional_model.FunctionalModel.hold`), so that the rerun during
  backward (and again during double backward) reads the same parameter tensors as the forward
  pass; ``torch.func.functional_call`` would have put the snapshot back by then.
* Hugging Face layers checkpoint only in train mode, and the copy is in eval mode when dropout
  is switched off: :func:`keep_checkpointing` makes the copy's layers that the user set to
  checkpoint (``gradient_checkpointing_enable()``) do so whenever gradients are recorded,
  non-reentrant (the copy is private: reentrant checkpointing cannot be differentiated twice).
* A pass that must run under modes (the training penalty's differentiable normalisation and
  attention kernels) cannot be rerun under them by ``torch.utils.checkpoint``: such a pass runs
  with the Hugging Face layers' checkpointing off (:func:`checkpointing_off`).
* ``torch.func`` transforms refuse saved-tensor hooks, on which non-reentrant checkpointing
  runs: the forward-over-reverse path cannot run through a checkpointed module
  (:func:`checkpoint_errors` says so by name; the Gauss-Newton matrix then multiplies through
  kept graphs, reverse mode only). Reentrant checkpointing in the user's own code cannot be
  differentiated with ``torch.autograd.grad``: named too.

Example:
    >>> import torch
    >>> from torch.utils.checkpoint import checkpoint
    >>> def loss(w):
    ...     return checkpoint(torch.sin, w, use_reentrant=False).sum()
    >>> with checkpoint_errors():
    ...     torch.func.grad(loss)(torch.ones(2))
    Traceback (most recent call last):
    ...
    hesslens.errors.HesslensInputError: torch.func transforms, on which path='forward' runs, ...
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hesslens.errors import HesslensInputError

#: Keyword arguments of a Hugging Face layer that a rerun must not write to twice (the KV cache).
_CACHE_KWARGS = ("cache", "layer_past", "past_key_value", "past_key_values")


def is_torch_func_refusal(err: BaseException) -> bool:
    """Whether ``err`` is ``torch.func`` refusing to run through the model: the saved-tensor
    hooks of non-reentrant checkpointing, or an ``autograd.Function`` without ``torch.func``
    support (reentrant checkpointing's is one)."""
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "support saved tensor hooks" in text
        or ("autograd.Function with functorch transforms" in text and "setup_context" in text))


def is_reentrant_error(err: BaseException) -> bool:
    """Whether ``err`` is reentrant checkpointing refusing ``torch.autograd.grad``."""
    text = str(err)
    return isinstance(err, RuntimeError) and ("incompatible with .grad()" in text or (
        "Checkpointing is not compatible with .grad()" in text))


REENTRANT_HINT = (
    "the model checkpoints activations with use_reentrant=True, through which "
    "torch.autograd.grad cannot differentiate (curvature products and the Hessian penalty "
    "differentiate with it): checkpoint with use_reentrant=False "
    "(torch.utils.checkpoint.checkpoint(..., use_reentrant=False); for a Hugging Face model "
    "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}))")

FUNCTORCH_HINT = (
    "torch.func transforms, on which path='forward' runs, cannot run through this model: it "
    "checkpoints activations (torch.utils.checkpoint), or has a torch.autograd.Function without "
    "torch.func support (reentrant checkpointing's is one). Use path='reverse' (double "
    "backward, which reruns the checkpointed modules) or path='fd'")


class checkpoint_errors:
    """Turn the errors of checkpointed models that curvature products cannot run through into
    named input errors that say what to do."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            return False
        if is_torch_func_refusal(exc):
            raise HesslensInputError(
                f"{FUNCTORCH_HINT} (PyTorch: {str(exc).splitlines()[0][:120]})") from exc
        if is_reentrant_error(exc):
            raise HesslensInputError(REENTRANT_HINT) from exc
        return False


def _hf_layers(module: nn.Module) -> list[nn.Module]:
    """The Hugging Face layers of ``module`` that checkpoint (``gradient_checkpointing_enable``)."""
    if "transformers" not in sys.modules:  # no model of transformers' exists without it
        return []
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # too old a transformers: nothing of its kind
        return []
    return [m for m in module.modules()
            if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def keep_checkpointing(module: nn.Module) -> bool:
    """Make the Hugging Face layers of ``module`` (a private copy) that checkpoint
    (``gradient_checkpointing_enable()``) do so whenever gradients are recorded, whatever the
    copy's mode, with non-reentrant ``torch.utils.checkpoint``; returns whether any does.

    transformers' layers checkpoint only in train mode (``self.gradient_checkpointing and
    self.training``); the copy is put in eval mode to switch dropout off, which would switch the
    checkpointing off with it. The hook that makes the input embeddings' output require grad
    (``make_inputs_require_grads``, for reentrant checkpointing) is dropped from the copy: its
    ``requires_grad_`` is refused inside ``torch.func`` transforms, and the copy's checkpointing
    is non-reentrant. Layers of transformers versions that checkpoint from the model's forward
    instead of the layer's are left as they are."""
    for m in module.modules():
        hooks = getattr(m, "_forward_hooks", {})
        for key in [k for k, h in hooks.items()
                    if getattr(h, "__name__", "") == "make_inputs_require_grads"]:
            del hooks[key]
    layers = _hf_layers(module)
    for m in layers:
        forward = type(m).forward
        m.forward = types.MethodType(_checkpointed(getattr(forward, "__wrapped__", forward)), m)
    return bool(layers)


@contextlib.contextmanager
def checkpointing_off(module: nn.Module) -> Iterator[None]:
    """Switch the checkpointing of ``module``'s Hugging Face layers off inside the block: for a
    pass under modes that a rerun in backward would not be under (``torch.utils.checkpoint``
    reruns outside them).

    Example:
        >>> import torch
        >>> with checkpointing_off(torch.nn.Linear(2, 2)):
        ...     pass
    """
    layers = _hf_layers(module)
    for m in layers:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in layers:
            m.gradient_checkpointing = True


def _checkpointed(plain: Callable[..., Any]) -> Callable[..., Any]:
    """A layer's forward that reruns ``plain`` in backward whenever gradients are recorded
    (the cache arguments cleared as transformers does: a rerun must not write it twice)."""

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return plain(self, *args, **kwargs)
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        if not getattr(self, "_can_checkpoint_with_cache", False):
            for key in _CACHE_KWARGS:
                if kwargs.get(key) is not None:
                    kwargs[key] = None
        return checkpoint(functools.partial(plain, self, **kwargs), *args, use_reentrant=False)

    return forward
