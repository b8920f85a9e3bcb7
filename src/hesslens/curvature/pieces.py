"""Pieces of parameters, and the model's parameter names that blocks are made of.

A :class:`ParamSlice` is a whole parameter or a contiguous range along one of its dimensions (the
query third of GPT-2's fused ``c_attn`` weight); a block is a list of them (:data:`Blocks`).
:class:`ModelParameters` holds what every way of building blocks needs to know about a model's
parameters: which are trainable, their shapes and order, the names tied weights go by, and the
module that owns each. Both sit below :mod:`hesslens.curvature.blocks` and
:mod:`hesslens.curvature.layouts`, which build blocks from them.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    >>> params = ModelParameters(model, ["0.weight", "1.weight", "1.bias"])
    >>> params.names, params.owner["1.bias"], params.shapes["0.weight"]
    (['0.weight', '1.weight', '1.bias'], '1', torch.Size([4, 3]))
    >>> str(ParamSlice("0.weight", 0, 0, 2))
    '0.weight[0:2]'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hesslens.curvature.layers import ROOT_LAYER, owned_parameters
from hesslens.errors import HesslensInputError

__all__ = ["Blocks", "ModelParameters", "ParamSlice", "name_list"]


@dataclass(frozen=True)
class ParamSlice:
    """A contiguous range along one dimension of one parameter, or the whole parameter.

    ``dim=None`` is the whole tensor; otherwise the elements with index ``start <= i < stop``
    along ``dim`` (``stop=None``: to the end; a negative ``dim`` counts from the last). The
    parameter's shape is given to each method, so a slice is checked where it is used.

    Example:
        >>> w = torch.arange(12.).reshape(3, 4)
        >>> piece = ParamSlice("w", dim=1, start=1, stop=3)
        >>> piece.take(w)
        tensor([[ 1.,  2.],
                [ 5.,  6.],
                [ 9., 10.]])
        >>> piece.flat_indices(w.shape), piece.numel(w.shape)
        (tensor([ 1,  2,  5,  6,  9, 10]), 6)
    """

    param: str
    dim: int | None = None
    start: int = 0
    stop: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.param, str) or not self.param:
            raise HesslensInputError(
                f"ParamSlice.param must be a parameter name (a non-empty str), not "
                f"{self.param!r}"
            )
        for field in ("dim", "start", "stop"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise HesslensInputError(
                    f"ParamSlice({self.param!r}).{field} must be an int, not {value!r}"
                )
        if self.dim is None and (self.start != 0 or self.stop is not None):
            raise HesslensInputError(
                f"ParamSlice({self.param!r}) has start/stop but dim=None: give the dimension "
                "to slice along (dim=0 for a Linear weight's output rows)"
            )
        if self.start < 0 or (self.stop is not None and self.stop <= self.start):
            raise HesslensInputError(
                f"ParamSlice({self.param!r}, dim={self.dim}, start={self.start}, "
                f"stop={self.stop}) is empty or negative: use 0 <= start < stop"
            )

    def bounds(self, shape: torch.Size | Sequence[int]) -> tuple[int, int, int] | None:
        """``(dim, start, stop)`` resolved against ``shape`` (dim non-negative, stop an int), or
        None for the whole tensor; raises :class:`HesslensInputError` when out of range."""
        if self.dim is None:
            return None
        ndim = len(shape)
        if ndim == 0:
            raise HesslensInputError(
                f"{self}: parameter {self.param!r} is a scalar, it has no dim to slice: use "
                f"ParamSlice({self.param!r})")
        if not -ndim <= self.dim < ndim:
            raise HesslensInputError(
                f"{self}: dim {self.dim} is out of range for parameter {self.param!r} of shape "
                f"{tuple(shape)}: use a dim in 0..{ndim - 1}")
        dim = self.dim % ndim
        size = int(shape[dim])
        stop = size if self.stop is None else self.stop
        if stop > size or self.start >= size:
            raise HesslensInputError(
                f"{self}: range {self.start}:{stop} is out of range for dimension {dim} of "
                f"parameter {self.param!r}, of size {size} (shape {tuple(shape)})"
            )
        return dim, self.start, stop

    def canonical(self, shape: torch.Size | Sequence[int]) -> ParamSlice:
        """The same piece with ``dim`` non-negative and ``stop`` explicit; a range that covers
        the whole dimension becomes the whole parameter."""
        b = self.bounds(shape)
        if b is None or (b[1] == 0 and b[2] == int(shape[b[0]])):
            return ParamSlice(self.param)
        return ParamSlice(self.param, *b)

    def numel(self, shape: torch.Size | Sequence[int]) -> int:
        """Number of elements of the slice in a parameter of ``shape``."""
        b = self.bounds(shape)
        total = math.prod(int(s) for s in shape)
        if b is None:
            return total
        dim, start, stop = b
        return total // int(shape[dim]) * (stop - start)

    def flat_indices(self, shape: torch.Size | Sequence[int]) -> torch.Tensor:
        """int64 indices into ``param.reshape(-1)`` of the slice's elements, ascending."""
        b = self.bounds(shape)
        if b is None:
            return torch.arange(math.prod(int(s) for s in shape), dtype=torch.int64)
        dim, start, stop = b
        outer = math.prod(int(s) for s in shape[:dim])
        inner = math.prod(int(s) for s in shape[dim + 1:])
        size = int(shape[dim])
        rows = torch.arange(outer, dtype=torch.int64)[:, None, None] * (size * inner)
        mids = torch.arange(start, stop, dtype=torch.int64)[None, :, None] * inner
        cols = torch.arange(inner, dtype=torch.int64)[None, None, :]
        return (rows + mids + cols).reshape(-1)

    def take(self, tensor: torch.Tensor, *, batch_dims: int = 0) -> torch.Tensor:
        """The slice of ``tensor``, which has the parameter's shape after ``batch_dims``
        leading dimensions (e.g. 1 for a ``(k, *shape)`` stack of vectors); a view."""
        b = self.bounds(tensor.shape[batch_dims:])
        if b is None:
            return tensor
        dim, start, stop = b
        return tensor.narrow(batch_dims + dim, start, stop - start)

    def __str__(self) -> str:
        """Numpy-style: ``w[0:16]``, ``w[:, 16:32]``, ``w[..., 0:4]``."""
        if self.dim is None:
            return self.param
        span = f"{self.start}:{'' if self.stop is None else self.stop}"
        if self.dim >= 0:
            return f"{self.param}[{', '.join([':'] * self.dim + [span])}]"
        return f"{self.param}[{', '.join(['...', span] + [':'] * (-1 - self.dim))}]"


Blocks = dict[str, list[ParamSlice]]  # {block name: its pieces, in order}


class ModelParameters:
    """The model's parameters as blocks see them: ``trainable`` (a set) and ``names`` (the
    trainable ones in ``named_parameters`` order), ``order`` and ``shapes`` of every parameter,
    ``alias`` (every name a parameter goes by, tied weights included, to the name
    ``named_parameters`` gives it) and ``owner`` (the module that owns it first; "" the model)."""

    def __init__(self, model: nn.Module, trainable: Sequence[str]) -> None:
        if isinstance(trainable, str):
            raise HesslensInputError(
                "trainable must be a list of parameter names, not one str")
        params = dict(model.named_parameters())
        unknown = [n for n in trainable if n not in params]
        if unknown:
            raise HesslensInputError(
                f"trainable names {unknown[:5]} are not parameters of the model; its "
                f"parameters are {name_list(list(params))}"
            )
        self.trainable = set(trainable)
        self.order = {name: i for i, name in enumerate(params)}  # named_parameters order
        self.shapes = {name: p.shape for name, p in params.items()}
        self.names = [n for n in params if n in self.trainable]
        canonical = {id(p): name for name, p in params.items()}
        self.alias = {
            name: canonical[id(p)]
            for name, p in model.named_parameters(remove_duplicate=False)
        }
        self.owner = {}  # canonical parameter name -> the module that owns it first
        for module, names in owned_parameters(model, lambda _n, _p: True).items():
            for name in names:
                self.owner[name] = "" if module == ROOT_LAYER else module

    def exact(self, name: str, block: str) -> str | None:
        """The canonical trainable name of ``name`` (a tied weight's alias maps to the name
        ``named_parameters`` gives it); an error if it is a parameter but not trainable."""
        canonical = self.alias.get(name)
        if canonical is not None and canonical not in self.trainable:
            raise HesslensInputError(
                f"block {block!r}: parameter {name!r} is not trainable (requires_grad=False or "
                "left out of the trainable parameters): make it trainable or drop it from the "
                "block"
            )
        return canonical


def name_list(names: Sequence[str], k: int = 8) -> str:
    """The first ``k`` names for an error message, and how many there are in all."""
    shown = ", ".join(names[:k])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > k else ''}]"
