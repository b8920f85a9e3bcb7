"""Curvature operators of a model's loss: the Hessian, the generalised Gauss-Newton matrix, the
residual between them, and each one's per-layer diagonal blocks.

Every operator is a symmetric linear operator over the flat vector of the trainable parameters it
covers, in ``model.named_parameters()`` order. It implements the ``hesslens.linalg`` protocol
(``dim``, ``dtype``, ``device``, ``matmat``), so any algorithm there runs on it, and it wraps the
common ones as methods: ``eigenvalues``, ``trace``, ``layer_traces``, ``density``.

Example:
    >>> import torch, hesslens as hl
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
    >>> H = hl.Hessian(model, torch.nn.functional.cross_entropy, data)
    >>> H.layers, H.dim
    (['0', '2'], 67)
    >>> H.hvp(torch.ones(H.dim)).shape
    torch.Size([67])
    >>> top = H.eigenvalues(k=2)
    >>> bool(top.converged.all()), bool(top.values[0] >= top.values[1])
    (True, True)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from hesslens.curvature.data import BatchSource
from hesslens.curvature.engine import LossFn, Path, ProductEngine
from hesslens.curvature.functional_model import BatchNormMode, FunctionalModel
from hesslens.curvature.layers import discover_layers, select_layers
from hesslens.errors import HesslensInputError

if TYPE_CHECKING:
    from scipy.sparse.linalg import LinearOperator
from hesslens.linalg import (
    EigenResult,
    Spectrum,
    TraceResult,
    block_traces,
    eigsh,
    hutchinson,
    hutchpp,
    slq,
)

Kind = Literal["hessian", "gauss_newton", "residual"]


class CurvatureOperator:
    """A curvature matrix of ``loss_fn(model(inputs), targets)`` averaged over ``data``.

    Parameters
    ----------
    model : nn.Module
        The network. It is never changed: products run on a private copy of it and a snapshot
        of its parameters taken now.
    loss_fn : callable
        ``loss_fn(outputs, targets)`` returning the batch's mean loss (a scalar tensor).
    data : (inputs, targets) or iterable of such pairs
        Over several batches the operator is that of the mean loss over all samples.
    layers : mapping of layer name to parameter names, optional
        Your own grouping of parameters into layers. Default: one layer per module that owns
        trainable parameters, in forward order.
    dtype, device : optional
        Analyse a copy of the model in this dtype (``torch.float64`` for reference precision)
        and on this device.
    batchnorm : {"eval", "batch"}
        BatchNorm uses its running statistics (default) or each batch's own statistics; running
        statistics are never updated either way.
    allow_dropout : bool
        Accept random products from dropout that is active in train mode.
    path, reuse_graph, chunk_size :
        How products are computed: see :class:`hesslens.curvature.engine.ProductEngine`.
    """

    kind: Kind = "hessian"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: object,
        *,
        layers: Mapping[str, Sequence[str]] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        batchnorm: BatchNormMode = "eval",
        allow_dropout: bool = False,
        path: Path = "auto",
        reuse_graph: bool | None = None,
        chunk_size: int = 32,
    ) -> None:
        fmodel = FunctionalModel(model, dtype=dtype, device=device, batchnorm=batchnorm,
                                 allow_dropout=allow_dropout)
        source = BatchSource(data)
        engine = ProductEngine(fmodel, loss_fn, source, path=path, reuse_graph=reuse_graph,
                               chunk_size=chunk_size)
        if layers is None:
            inputs = source.first()[0]
            example = inputs[:1] if isinstance(inputs, torch.Tensor) else tuple(
                t[:1] for t in inputs)
            layer_map = discover_layers(model, _like_model(example, model))
        else:
            layer_map = _check_grouping(layers, fmodel.trainable)
        self._setup(engine, layer_map, list(fmodel.trainable), label="full")

    def _setup(self, engine: ProductEngine, layer_map, names: list[str], label: str) -> None:
        self._engine = engine
        self._layer_map = {k: list(v) for k, v in layer_map.items()}
        self._names = names
        shapes = [engine.model.params[n].shape for n in names]
        self._sizes = [int(np.prod(s)) if len(s) else 1 for s in shapes]
        self._offsets = dict(zip(names, np.cumsum([0, *self._sizes[:-1]]).tolist()))
        self.label = label
        self.n_products = 0

    def _derived(self, kind: Kind, layer_map, names: list[str], label: str):
        cls = {"hessian": Hessian, "gauss_newton": GaussNewton,
               "residual": GaussNewtonResidual}[kind]
        op = cls.__new__(cls)
        op._setup(self._engine, layer_map, names, label)
        return op

    # ------------------------------------------------------------------ structure
    @property
    def layers(self) -> list[str]:
        """Names of the layers this operator covers, in forward order."""
        return list(self._layer_map)

    @property
    def layer_parameters(self) -> dict[str, list[str]]:
        """Each layer's parameter names."""
        return {k: list(v) for k, v in self._layer_map.items()}

    @property
    def parameter_names(self) -> list[str]:
        """The parameters this operator covers, in the order of the flat vector."""
        return list(self._names)

    @property
    def dim(self) -> int:
        """Length of the flat parameter vector (the operator is ``dim x dim``)."""
        return int(sum(self._sizes))

    @property
    def dtype(self) -> torch.dtype:
        return self._engine.model.dtype

    @property
    def device(self) -> torch.device:
        return self._engine.model.device

    @property
    def num_samples(self) -> int:
        """How many samples the loss averages over."""
        return self._engine.data.num_samples

    @property
    def engine_choice(self) -> dict[str, str]:
        """The product path chosen for single and batched products (after the first products)."""
        return dict(self._engine.choice)

    def layer_slices(self) -> dict[str, list[slice]]:
        """Where each layer's parameters lie in this operator's flat vector."""
        out = {}
        for layer, params in self._layer_map.items():
            out[layer] = [
                slice(self._offsets[p], self._offsets[p] + self._sizes[self._names.index(p)])
                for p in params
            ]
        return out

    def block(self, name: str | Sequence[str]) -> CurvatureOperator:
        """The diagonal block of one layer (or of several, given a list of names): the same
        interface, restricted to those parameters; its products differentiate only with
        respect to them."""
        chosen = select_layers(self._layer_map, name)
        layer_map = {k: self._layer_map[k] for k in chosen}
        names = [n for n in self._names if any(n in layer_map[k] for k in chosen)]
        label = chosen[0] if len(chosen) == 1 else "+".join(chosen)
        return self._derived(self.kind, layer_map, names, label)

    def gauss_newton(self) -> GaussNewton:
        """The Gauss-Newton part ``G`` of this operator's Hessian, on the same parameters."""
        return self._derived("gauss_newton", self._layer_map, self._names, self.label)

    def residual(self) -> GaussNewtonResidual:
        """The residual ``Hess - G``, on the same parameters."""
        return self._derived("residual", self._layer_map, self._names, self.label)

    def hessian(self) -> Hessian:
        """The full Hessian on the same parameters."""
        return self._derived("hessian", self._layer_map, self._names, self.label)

    # ------------------------------------------------------------------ products
    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Products with a (k, dim) batch of row vectors: row i of the result is ``A V[i]``."""
        if V.dim() != 2 or V.shape[1] != self.dim:
            raise HesslensInputError(
                f"expected a (k, {self.dim}) batch of vectors, got shape {tuple(V.shape)}"
            )
        if V.shape[0] == 0:
            return V.new_zeros(V.shape)
        V = V.to(device=self.device, dtype=self.dtype)
        self.n_products += V.shape[0]
        engine = self._engine
        if self.kind == "hessian":
            return engine.hessian_products(self._names, V)
        if self.kind == "gauss_newton":
            return engine.gauss_newton_products(self._names, V)
        return engine.hessian_products(self._names, V) - engine.gauss_newton_products(
            self._names, V)

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """The product with a flat vector ``v`` of length ``dim``, or with each row of a (k, dim)
        batch; the result has ``v``'s shape, dtype and device."""
        if not isinstance(v, torch.Tensor):
            raise HesslensInputError(f"v must be a torch tensor, not {type(v).__name__}")
        if v.dim() == 1:
            return self.matmat(v.unsqueeze(0))[0].to(device=v.device, dtype=v.dtype)
        if v.dim() == 2:
            return self.matmat(v).to(device=v.device, dtype=v.dtype)
        raise HesslensInputError(
            f"v must be a flat vector ({self.dim},) or a batch (k, {self.dim}), got shape "
            f"{tuple(v.shape)}"
        )

    def dense(self, max_dim: int = 20_000) -> torch.Tensor:
        """The whole matrix, built column by column (``dim`` products): for small models."""
        if self.dim > max_dim:
            raise HesslensInputError(
                f"the operator is {self.dim} x {self.dim}; dense() stops at max_dim={max_dim}"
            )
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        cols = [self.matmat(eye[i : i + 64]) for i in range(0, self.dim, 64)]
        M = torch.cat(cols, dim=0)
        return (M + M.T) / 2

    def to_scipy(self) -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` in float64 (numpy in, numpy out)."""
        from scipy.sparse.linalg import LinearOperator

        def matmat(X: np.ndarray) -> np.ndarray:
            X = np.asarray(X, dtype=np.float64)
            if X.ndim == 1:
                X = X[:, None]
            V = torch.as_tensor(X.T.copy())
            return self.matmat(V).to("cpu", torch.float64).numpy().T

        return LinearOperator((self.dim, self.dim), matvec=matmat, matmat=matmat,
                              rmatvec=matmat, rmatmat=matmat, dtype=np.float64)

    def loss_and_gradient(self) -> tuple[float, torch.Tensor]:
        """The mean loss and its flat gradient with respect to this operator's parameters."""
        return self._engine.loss_and_gradient(self._names)

    # ------------------------------------------------------------------ estimators
    def eigenvalues(
        self,
        k: int = 5,
        *,
        which: str = "LA",
        tol: float = 1e-6,
        max_steps: int | None = None,
        seed: int = 0,
        return_vectors: bool = True,
    ) -> EigenResult:
        """The top-``k`` eigenvalues (``which="LA"``; also ``"SA"``, ``"LM"``) by Lanczos with full
        reorthogonalisation, stopped on the a-posteriori error bound of each Ritz value."""
        _check_k(k, self.dim)
        return eigsh(self, k=k, which=which, tol=tol, max_steps=max_steps, seed=seed,
                     return_vectors=return_vectors)

    def trace(
        self,
        *,
        method: str = "hutch++",
        rtol: float = 0.01,
        max_hvp: int = 1000,
        n_hvp: int | None = None,
        distribution: str = "rademacher",
        seed: int = 0,
    ) -> TraceResult:
        """The trace. ``"hutch++"`` (default): sketch-deflated Hutchinson that stops when its
        standard error falls below ``rtol`` of the estimate (or at ``max_hvp`` products);
        ``"hutchinson"`` and ``"hutch++-fixed"`` spend exactly ``n_hvp`` products; ``"exact"``
        spends ``dim``."""
        if method == "hutch++":
            full, _ = block_traces(self, None, rtol=rtol, max_hvp=n_hvp or max_hvp,
                                   distribution=distribution, seed=seed)
            return full
        if method == "hutchinson":
            return hutchinson(self, n_hvp=n_hvp or 100, distribution=distribution, seed=seed)
        if method == "hutch++-fixed":
            return hutchpp(self, n_hvp=n_hvp or 99, distribution=distribution, seed=seed)
        if method == "exact":
            value = float(torch.diagonal(self.dense()).sum())
            return TraceResult(value=value, stderr=0.0, n_hvp=self.dim, method="exact",
                               n_samples=0, converged=True)
        raise HesslensInputError(
            f"unknown trace method {method!r}: use 'hutch++', 'hutchinson', 'hutch++-fixed' or "
            "'exact'"
        )

    def traces(
        self,
        *,
        rtol: float = 0.01,
        max_hvp: int = 1000,
        distribution: str = "rademacher",
        seed: int = 0,
    ) -> tuple[TraceResult, dict[str, TraceResult]]:
        """The full trace and every layer's block trace from one shared set of probes: for
        Rademacher ``v``, ``E[v_l . (H v)_l] = tr(H_ll)``. The layer estimates add up to the full
        one exactly."""
        slices = self.layer_slices()
        perm = torch.cat([torch.arange(s.start, s.stop) for ss in slices.values() for s in ss])
        covered = len(perm)
        if covered < self.dim:
            rest = torch.ones(self.dim, dtype=torch.bool)
            rest[perm] = False
            perm = torch.cat([perm, torch.nonzero(rest).flatten()])
        view = _Permuted(self, perm)
        ranges, start = {}, 0
        for layer, ss in slices.items():
            size = sum(s.stop - s.start for s in ss)
            ranges[layer] = slice(start, start + size)
            start += size
        return block_traces(view, ranges, rtol=rtol, max_hvp=max_hvp, distribution=distribution,
                            seed=seed)

    def layer_traces(self, **kwargs: Any) -> dict[str, TraceResult]:
        """Every layer's block trace ``tr(H_ll)`` from shared full-network probes (see
        :meth:`traces`)."""
        return self.traces(**kwargs)[1]

    def density(
        self,
        *,
        n_probes: int = 8,
        n_steps: int = 80,
        deflate: int | EigenResult | None = 10,
        distribution: str = "rademacher",
        seed: int = 0,
    ) -> Spectrum:
        """The spectral density by stochastic Lanczos quadrature, probes run as one batch.
        ``deflate`` (an int ``k`` or a result of :meth:`eigenvalues` with vectors) removes the
        top eigenpairs first and adds them back exactly, which sharpens the outliers and the
        density's mean."""
        if isinstance(deflate, int) and not isinstance(deflate, bool):
            k = min(deflate, max(self.dim - 2, 0))
            deflate = self.eigenvalues(k=k, tol=1e-4, seed=seed) if k > 0 else None
            if deflate is not None and not bool(torch.as_tensor(deflate.converged).all()):
                warnings.warn(
                    f"density(): {int((~torch.as_tensor(deflate.converged)).sum())} of the {k} "
                    "eigenpairs used for deflation did not converge; the outliers of the "
                    "density are approximate (pass deflate=0, or a converged eigenvalues() "
                    "result)", stacklevel=2)
        spectrum, _ = slq(self, n_probes=n_probes, n_steps=min(n_steps, self.dim), seed=seed,
                          distribution=distribution, deflate=deflate)
        return spectrum

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.label!r}, dim={self.dim}, layers={len(self.layers)},"
                f" samples={self.num_samples}, dtype={self.dtype}, device={self.device})")


class Hessian(CurvatureOperator):
    """The Hessian of the mean loss with respect to the trainable parameters."""

    kind: Kind = "hessian"


class GaussNewton(CurvatureOperator):
    """The generalised Gauss-Newton matrix ``G = J^T (d2 loss / d outputs2) J``."""

    kind: Kind = "gauss_newton"


class GaussNewtonResidual(CurvatureOperator):
    """The residual ``Hess - G`` of the Gauss-Newton split (each product costs a Hessian product
    and a Gauss-Newton product)."""

    kind: Kind = "residual"


class _Permuted:
    """``P A P^T`` for a coordinate permutation: makes layer blocks contiguous."""

    def __init__(self, op: CurvatureOperator, perm: torch.Tensor) -> None:
        self.op, self.perm = op, perm.to(op.device)
        self.inverse = torch.empty_like(self.perm)
        self.inverse[self.perm] = torch.arange(len(perm), device=op.device)
        self.dim, self.dtype, self.device = op.dim, op.dtype, op.device

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        V = V.to(device=self.device, dtype=self.dtype)
        return self.op.matmat(V[:, self.inverse])[:, self.perm]


def _check_k(k: int, dim: int) -> None:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise HesslensInputError(f"k must be a positive integer, got {k!r}")
    if k > dim:
        raise HesslensInputError(
            f"k={k} is larger than the operator's dimension {dim}: ask for at most {dim}"
        )


def _check_grouping(layers: Mapping[str, Iterable[str]], trainable: list[str]):
    known = set(trainable)
    seen: dict[str, str] = {}
    out = {}
    for layer, params in layers.items():
        params = list(params)
        if not params:
            raise HesslensInputError(f"layer {layer!r} has no parameters")
        for p in params:
            if p not in known:
                raise HesslensInputError(
                    f"layer {layer!r} names parameter {p!r}, which is not a trainable parameter "
                    f"of the model; trainable parameters: {trainable}"
                )
            if p in seen:
                raise HesslensInputError(
                    f"parameter {p!r} is in both layer {seen[p]!r} and layer {layer!r}"
                )
            seen[p] = layer
        out[str(layer)] = params
    return out


def _like_model(example: object, model: nn.Module) -> object:
    """``example`` on the model's own device, floating inputs in its dtype: the layer order is
    found by one forward pass of (a copy of) the user's model, whatever ``dtype=`` and
    ``device=`` the operator itself uses."""
    ref = next(iter(model.parameters()), None)
    if ref is None:
        return example

    def like(t: object) -> object:
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(device=ref.device, dtype=ref.dtype if t.is_floating_point() else t.dtype)

    return like(example) if isinstance(example, torch.Tensor) else tuple(
        like(t) for t in example)  # type: ignore[union-attr]
