"""A private, frozen copy of a model for curvature products.

Products must never change the user's model: no BatchNorm running-statistic update, no
parameter or buffer mutation. The operators therefore evaluate a deep copy of the model on a
snapshot of the parameters taken at construction, each call with the tensors it is given put in
the copy's modules as ``torch.func.functional_call`` does. They stay there after the call (until
the next call or :meth:`FunctionalModel.release`): a module checkpointed with
``torch.utils.checkpoint`` runs again during backward, and must then read the tensors its forward
pass read (:mod:`hesslens.curvature.checkpointing`).

BatchNorm: ``batchnorm="eval"`` (default) uses the running statistics, whatever mode the model is
in; ``batchnorm="batch"`` normalises with each batch's own statistics (train-mode semantics)
without writing them anywhere. Dropout that is active (module in train mode, ``p > 0``) would make
every product random: the copy is put in eval mode (with a warning that says so) unless
``allow_dropout=True`` asks for random products.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    >>> frozen = FunctionalModel(net)
    >>> frozen.module[1].training, net[1].training  # the copy's BatchNorm uses running stats
    (False, True)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.stateless import _reparametrize_module

from hesslens.curvature.checkpointing import keep_checkpointing
from hesslens.curvature.layers import record_call_order
from hesslens.errors import HesslensInputError

BatchNormMode = Literal["eval", "batch"]
_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                  nn.FeatureAlphaDropout)


#: Parameters above this many bytes are not copied by default (``snapshot=None``): the
#: operator uses the model's own and refuses to go on once they change.
SNAPSHOT_BYTES = 16 * 2**20


class FunctionalModel:
    """A copy of ``model``'s modules in the requested dtype and device, with BatchNorm and
    dropout set up for deterministic products; ``params`` and ``buffers`` are detached snapshots
    of the parameters (``snapshot=True``, the default for models up to 16 MiB of parameters),
    or the model's own parameters, checked unchanged before every use (``snapshot=False``, the
    default above that: no second copy of a large model)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        batchnorm: BatchNormMode = "eval",
        allow_dropout: bool = False,
        snapshot: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise HesslensInputError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        if batchnorm not in ("eval", "batch"):
            raise HesslensInputError(f"batchnorm must be 'eval' or 'batch', not {batchnorm!r}")
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise HesslensInputError(
                "the model has no trainable parameters (all have requires_grad=False): there is "
                "no Hessian to analyse"
            )
        meta = [n for n, p in model.named_parameters() if p.is_meta]
        if meta:
            raise HesslensInputError(
                f"the model's parameters {meta[:3]}{' ...' if len(meta) > 3 else ''} are on the "
                "meta device: they have shapes but no values (a model built under "
                "init_empty_weights or device='meta'). Load its weights first, e.g. "
                "model.to_empty(device='cpu') and model.load_state_dict(...)")
        active_dropout = [name for name, m in model.named_modules() if _active_dropout(m)]
        self.random = bool(active_dropout)
        dropout_off = bool(active_dropout) and not allow_dropout
        if dropout_off:
            self.random = False
            warnings.warn(
                f"dropout is active in train mode in {active_dropout[:3]}"
                f"{' ...' if len(active_dropout) > 3 else ''}: the curvature is measured with "
                "dropout off (the private copy is in eval mode, BatchNorm as batchnorm= says). "
                "Call model.eval() to silence this, or pass allow_dropout=True for random "
                "products with dropout on", stacklevel=3)
        model_device = trainable[0].device
        self.device = torch.device(device) if device is not None else model_device
        self.device_requested = device is not None
        self.dtype = dtype if dtype is not None else trainable[0].dtype
        converts = self.device != model_device or self.dtype != trainable[0].dtype
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.shared = not converts and (
            snapshot is False or (snapshot is None and param_bytes > SNAPSHOT_BYTES))
        if self.shared:
            # the copy's modules are new, their parameters and buffers the model's own
            memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
            module = copy.deepcopy(model, memo)
        else:
            module = copy.deepcopy(model)
            module.to(device=self.device, dtype=self.dtype)
        if dropout_off:
            module.eval()
        for m in module.modules():
            if isinstance(m, _BatchNorm):
                if batchnorm == "eval":
                    m.eval()
                else:
                    # Batch statistics, never written back: with no running buffers, BatchNorm
                    # normalises with the batch's own mean and variance in either mode.
                    m.train()
                    m.track_running_stats = False
                    m.running_mean = None
                    m.running_var = None
                    m.num_batches_tracked = None
        self.module = module
        # the user's Hugging Face checkpointing stays in effect in the copy, in eval mode too
        self.checkpointing = keep_checkpointing(module)
        self._held: Any = None
        self.batchnorm = batchnorm
        self.params = {n: p.detach() for n, p in module.named_parameters()}
        self.buffers = {n: b.detach() for n, b in module.named_buffers()}
        self._aliases = _tied_aliases(module)
        self.trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        if not self.shared:
            for p in module.parameters():
                p.requires_grad_(False)
        self._model_params = dict(model.named_parameters()) if self.shared else {}
        self._versions = self._current_versions()

    def _current_versions(self) -> dict[str, int]:
        return {n: p._version for n, p in self._model_params.items()}

    def check_unchanged(self) -> None:
        """Where the parameters are the model's own (not copied), refuse to go on after they
        changed in place (an optimizer step, ``load_state_dict``): the operator's products,
        estimates and cached graphs are those of the weights it was built on."""
        if self._model_params and self._current_versions() != self._versions:
            raise HesslensInputError(
                "the model's parameters changed since the operator took them (an optimizer "
                "step, load_state_dict): call reload_parameters(model) to analyse the new "
                "weights, or build the operator with snapshot=True to keep a copy of the old "
                "ones")

    def load_from(self, model: nn.Module) -> None:
        """Take ``model``'s current parameters and buffers: copied into the snapshot in place
        (no new copy of the model), or, where they are the model's own, taken as they are now.
        The same network later in training: names and shapes must match."""
        self.release()
        model_params = dict(model.named_parameters())
        missing = [n for n in self.params if n not in model_params]
        if missing or len(model_params) != len(self.params):
            raise HesslensInputError(
                f"the model's parameters are not those the operator was built on (missing "
                f"{missing[:3]}, {len(model_params)} against {len(self.params)}): build a new "
                "operator for another model")
        for name, target in self.params.items():
            source = model_params[name].detach()
            if source.shape != target.shape:
                raise HesslensInputError(
                    f"parameter {name!r} has shape {tuple(source.shape)}, the operator's "
                    f"{tuple(target.shape)}: build a new operator for another model")
            if self.shared:  # the model's own parameters, never written to
                self.params[name] = source
            else:
                target.copy_(source)
        model_buffers = dict(model.named_buffers())
        for name, target in self.buffers.items():
            source = model_buffers.get(name)
            if isinstance(source, torch.Tensor) and source.shape == target.shape:
                if self.shared:
                    self.buffers[name] = source.detach()
                else:
                    target.copy_(source.detach())
        if self.shared:
            self._model_params = model_params
            self._versions = self._current_versions()

    def __call__(self, params: dict[str, torch.Tensor], args: tuple = (),
                 kwargs: dict | None = None) -> Any:
        """The model's output with ``params`` overriding the snapshot; the tensors stay in the
        copy's modules until the next call or :meth:`release` (a checkpointed module reruns
        during backward with them)."""
        self.hold({**self.params, **params})
        return self.module(*tuple(args), **(kwargs or {}))

    def hold(self, params: dict[str, torch.Tensor]) -> None:
        """Put ``params`` (every parameter) and the buffers in the copy's modules (tied weights
        alike) until the next :meth:`hold` or :meth:`release`: what ``functional_call`` does for
        the length of one call, kept for the backward passes that rerun checkpointed modules
        (the data loop holds a cached graph's leaves again before it differentiates it)."""
        self.release()
        tensors = {**params, **self.buffers}
        tensors.update({alias: tensors[name] for alias, name in self._aliases.items()
                        if name in tensors})
        held = _reparametrize_module(self.module, tensors)
        held.__enter__()
        self._held = held

    def release(self) -> None:
        """Put the snapshot's own tensors back in the copy's modules (nothing of a product is
        kept alive by them)."""
        held, self._held = self._held, None
        if held is not None:
            held.__exit__(None, None, None)

    def bind(self, params: dict[str, torch.Tensor]) -> Callable[..., Any]:
        """``forward(*args, **kwargs)`` of the model with ``params`` overriding the snapshot."""
        return lambda *args, **kwargs: self(params, args, kwargs)

    def call_order(self, run: Callable[[], object], wanted: set[str]) -> dict[str, int]:
        """Run ``run()`` (a forward pass of this copy) and record when each wanted module is
        first called; the copy's module names are the user's model's."""
        return record_call_order(self.module, run, wanted)


def _tied_aliases(module: nn.Module) -> dict[str, str]:
    """Every other name of a tied parameter or buffer, mapped to its first name (the one
    ``named_parameters()`` gives): found once here, not on every call as
    ``functional_call(tie_weights=True)`` does."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, t in [*module.named_parameters(remove_duplicate=False),
                    *module.named_buffers(remove_duplicate=False)]:
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
    return aliases


def _active_dropout(m: nn.Module) -> bool:
    """Dropout modules in train mode with ``p > 0``, and modules with their own dropout rate
    (``nn.MultiheadAttention(dropout=...)``, transformer layers) in train mode."""
    if not m.training:
        return False
    if isinstance(m, _DROPOUT_TYPES):
        return m.p > 0
    rate = getattr(m, "dropout", None)
    return isinstance(rate, float) and rate > 0
