"""Symmetric linear operators given by a batched matrix-vector product.

Every algorithm of :mod:`hesslens.linalg` sees a matrix only through
:class:`SymmetricOperator`: a size ``dim``, a ``dtype``, a ``device`` and one method,
``matmat``, that multiplies a batch of row vectors. Hessians, Gauss-Newton matrices and
their layer blocks implement it elsewhere in the package; here are the small adapters the
algorithms and the tests need: a dense matrix, a product counter, a deflation, and
:func:`as_operator` to turn what a user passes into an operator.

Example
-------
>>> import torch
>>> from hesslens.linalg import CountingOperator, MatrixOperator
>>> op = CountingOperator(MatrixOperator(torch.diag(torch.tensor([3.0, 1.0]))))
>>> op.matmat(torch.eye(2))
tensor([[3., 0.],
        [0., 1.]])
>>> op.n_products
2
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from hesslens.errors import (
    CurvatureUnderflowError,
    HesslensInputError,
    NonFiniteCurvatureError,
)

__all__ = [
    "CountingOperator",
    "DeflatedOperator",
    "MatrixOperator",
    "SymmetricOperator",
    "as_operator",
    "check_finite",
    "check_normal_range",
    "matmat_as",
    "product_eps",
]


@runtime_checkable
class SymmetricOperator(Protocol):
    """A symmetric ``dim x dim`` matrix known through batched products.

    Attributes
    ----------
    dim : int
        Size of the (square) matrix.
    dtype : torch.dtype
        Floating dtype the product works in; algorithms cast their vectors to it.
    device : torch.device
        Device the product's input and output live on.

    Notes
    -----
    ``matmat(V)`` takes a ``(k, dim)`` batch of row vectors and returns the ``(k, dim)``
    batch whose row ``i`` is ``A @ V[i]``. The algorithms count cost in products: one row
    of ``V`` is one product. An operator whose products are computed in a lower precision
    than ``dtype`` (a bfloat16 network fed float32 vectors) declares it as a float attribute
    ``product_eps``: every stopping rule derives from it (:func:`product_eps`). An operator
    may also offer ``matmat_into(V, out)``, the same products written into ``out`` (a tensor
    of its dtype and device) and returned: the Lanczos steps then keep no product beside their
    basis (:func:`matmat_as`).
    """

    dim: int
    dtype: torch.dtype
    device: torch.device

    def matmat(self, V: Tensor) -> Tensor:
        """Return the batch ``A @ V[i]`` for every row ``i`` of the ``(k, dim)`` tensor."""
        ...


def product_eps(op: object) -> float:
    """The relative precision of ``op``'s products: ``op.product_eps`` when the operator
    declares it (products computed in a lower precision than their vectors), else the machine
    epsilon of ``op.dtype``.

    >>> import torch
    >>> product_eps(MatrixOperator(torch.eye(2)))
    1.1920928955078125e-07
    """
    declared = getattr(op, "product_eps", None)
    if declared is None:
        return float(torch.finfo(op.dtype).eps)
    eps = float(declared)
    if not 0.0 < eps < 1.0:
        raise HesslensInputError(
            f"{type(op).__name__}.product_eps must be a relative precision in (0, 1), got "
            f"{declared!r}")
    return eps


def _check_batch(V: Tensor, dim: int) -> None:
    if V.ndim != 2 or V.shape[1] != dim:
        raise HesslensInputError(
            f"matmat expects a (k, {dim}) batch of row vectors, got shape {tuple(V.shape)}"
        )


class MatrixOperator:
    """A dense symmetric matrix as a :class:`SymmetricOperator`.

    Parameters
    ----------
    matrix : Tensor
        Square ``(n, n)`` symmetric tensor. Symmetry is assumed, not checked: only the
        products ``A @ v`` are used.

    Attributes
    ----------
    n_products : int
        Number of vectors multiplied so far (the sum of ``k`` over ``matmat`` calls).

    Examples
    --------
    >>> import torch
    >>> op = MatrixOperator(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
    >>> op.matmat(torch.tensor([[1.0, 1.0]]))
    tensor([[3., 3.]])
    >>> op.dim, op.n_products
    (2, 1)
    """

    def __init__(self, matrix: Tensor) -> None:
        if not isinstance(matrix, Tensor):
            matrix = torch.as_tensor(np.asarray(matrix))
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise HesslensInputError(
                f"MatrixOperator needs a square 2-D matrix, got shape {tuple(matrix.shape)}"
            )
        if not matrix.is_floating_point():
            matrix = matrix.to(torch.get_default_dtype())
        self.matrix = matrix
        self.dim = int(matrix.shape[0])
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.n_products = 0

    def matmat(self, V: Tensor) -> Tensor:
        """Return ``V @ A`` (row ``i`` is ``A @ V[i]`` because ``A`` is symmetric)."""
        _check_batch(V, self.dim)
        self.n_products += int(V.shape[0])
        return V.to(self.dtype) @ self.matrix

    def __repr__(self) -> str:
        return f"MatrixOperator(dim={self.dim}, dtype={self.dtype}, device={self.device})"


class CountingOperator:
    """Wrap an operator and count the vectors it multiplies.

    Parameters
    ----------
    op : SymmetricOperator
        The operator to wrap; products are passed through unchanged.

    Attributes
    ----------
    n_products : int
        Number of vectors multiplied so far.
    n_calls : int
        Number of ``matmat`` calls so far.

    Examples
    --------
    >>> import torch
    >>> op = CountingOperator(MatrixOperator(torch.eye(3)))
    >>> _ = op.matmat(torch.ones(4, 3))
    >>> op.n_products, op.n_calls
    (4, 1)
    """

    def __init__(self, op: SymmetricOperator) -> None:
        self.op = op
        self.dim = op.dim
        self.dtype = op.dtype
        self.device = op.device
        self.product_eps = product_eps(op)
        self.n_products = 0
        self.n_calls = 0

    def matmat(self, V: Tensor) -> Tensor:
        """Multiply through the wrapped operator, counting ``V.shape[0]`` products."""
        _check_batch(V, self.dim)
        self.n_products += int(V.shape[0])
        self.n_calls += 1
        return self.op.matmat(V)

    def __repr__(self) -> str:
        return f"CountingOperator({self.op!r}, n_products={self.n_products})"


class DeflatedOperator:
    """The deflation ``P A P`` with ``P = I - U^T U`` for an orthonormal basis ``U``.

    The operator acts as ``A`` on the orthogonal complement of the rows of ``U`` and as zero
    on their span: its eigenvalues are those of ``A`` with the ones of the deflated
    eigenvectors replaced by zeros.

    Parameters
    ----------
    op : SymmetricOperator
        The operator ``A``.
    basis : Tensor
        ``(r, dim)`` tensor with orthonormal rows (e.g. eigenvectors from
        :func:`~hesslens.linalg.eigsh`). The projections are done in float64.

    Examples
    --------
    >>> import torch
    >>> A = MatrixOperator(torch.diag(torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64)))
    >>> op = DeflatedOperator(A, torch.tensor([[1.0, 0.0, 0.0]]))
    >>> op.matmat(torch.eye(3, dtype=torch.float64)).diagonal()
    tensor([0., 2., 1.], dtype=torch.float64)
    """

    def __init__(self, op: SymmetricOperator, basis: Tensor) -> None:
        basis = torch.as_tensor(basis)
        if basis.ndim == 1:
            basis = basis.unsqueeze(0)
        if basis.ndim != 2 or basis.shape[1] != op.dim:
            raise HesslensInputError(
                f"basis must have shape (r, {op.dim}), got {tuple(basis.shape)}"
            )
        self.op = op
        self.dim = op.dim
        self.dtype = op.dtype
        self.device = op.device
        self.product_eps = product_eps(op)
        self.basis = basis.to(device=op.device, dtype=torch.float64)

    def _project(self, V: Tensor) -> Tensor:
        return V - (V @ self.basis.T) @ self.basis

    def matmat(self, V: Tensor) -> Tensor:
        """Return the rows of ``P A P V^T`` (one product per row of ``V``)."""
        _check_batch(V, self.dim)
        W = self._project(V.to(torch.float64))
        AW = self.op.matmat(W.to(self.dtype)).to(torch.float64)
        return self._project(AW).to(self.dtype)

    def __repr__(self) -> str:
        return f"DeflatedOperator({self.op!r}, rank={self.basis.shape[0]})"


class _ScipyOperator:
    """Adapter for a ``scipy.sparse.linalg.LinearOperator`` (products done in numpy)."""

    def __init__(self, linop: Any) -> None:
        n, m = linop.shape
        if n != m:
            raise HesslensInputError(f"need a square operator, got shape {linop.shape}")
        self.linop = linop
        self.dim = int(n)
        dtype = np.dtype(linop.dtype) if linop.dtype is not None else np.dtype(np.float64)
        self.dtype = torch.float32 if dtype == np.float32 else torch.float64
        self.device = torch.device("cpu")

    def matmat(self, V: Tensor) -> Tensor:
        _check_batch(V, self.dim)
        out = self.linop.matmat(V.detach().cpu().numpy().T)
        return torch.as_tensor(np.asarray(out).T.copy(), dtype=self.dtype)


def as_operator(obj: Any) -> SymmetricOperator:
    """Turn ``obj`` into a :class:`SymmetricOperator`.

    Parameters
    ----------
    obj : SymmetricOperator, Tensor, numpy.ndarray or scipy LinearOperator
        An object with ``dim``, ``dtype``, ``device`` and ``matmat`` is returned as is; a
        dense square matrix becomes a :class:`MatrixOperator`; a square
        ``scipy.sparse.linalg.LinearOperator`` is wrapped (products on the CPU).

    Returns
    -------
    SymmetricOperator

    Raises
    ------
    TypeError
        For anything else.

    Examples
    --------
    >>> import torch
    >>> as_operator(torch.eye(4)).dim
    4
    """
    if isinstance(obj, SymmetricOperator):
        return obj
    if isinstance(obj, (Tensor, np.ndarray)):
        return MatrixOperator(torch.as_tensor(obj))
    if hasattr(obj, "matmat") and hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return _ScipyOperator(obj)
    raise TypeError(
        "expected a SymmetricOperator (dim, dtype, device, matmat), a square tensor or a "
        f"scipy LinearOperator, got {type(obj).__name__}"
    )


def check_finite(out: Tensor) -> Tensor:
    """Return ``out`` if every entry is finite, else raise :class:`NonFiniteCurvatureError`.

    Every estimator of :mod:`hesslens.linalg` multiplies through :func:`matmat64` or
    :func:`matmat_as`, which make this check on each product: a NaN or infinite product stops
    the estimate with an error instead of a NaN result (or a ``converged=True`` on garbage).

    Examples
    --------
    >>> import torch
    >>> check_finite(torch.ones(2)).tolist()
    [1.0, 1.0]
    >>> check_finite(torch.tensor([1.0, float("nan")]))
    Traceback (most recent call last):
    ...
    hesslens.errors.NonFiniteCurvatureError: a curvature product is not finite (1 NaN ...
    """
    if out.numel() == 0:
        return out
    lo, hi = torch.aminmax(out)  # one pass, no temporary; NaN and +-Inf propagate
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return out
    _raise_non_finite(out)


def _raise_non_finite(out: Tensor) -> None:
    n_nan = int(torch.isnan(out).sum())
    n_inf = int(torch.isinf(out).sum())
    raise NonFiniteCurvatureError(
        f"a curvature product is not finite ({n_nan} NaN and {n_inf} infinite entries of "
        f"{out.numel()}): the loss is finite but its second derivative is not; check the model "
        "for operations whose second derivative blows up at these parameters (sqrt, log or a "
        "division near 0, overflow in float16/bfloat16), or evaluate in float32/float64"
    )


def check_normal_range(out: Tensor, V: Tensor) -> Tensor:
    """Return ``out = A V`` unless the operator is below the normal range of ``out.dtype``.

    When the largest ``|entry|`` of ``out`` over that of ``V`` (the operator's size along
    ``V``) is below the dtype's smallest normal number, its products are subnormal, their
    precision is lost (float32 keeps ~7 fewer bits at 1e-40) and the algorithms' small dense
    problems fail or come out as noise: raise :class:`CurvatureUnderflowError` instead. A
    product that is exactly zero passes (a zero operator's estimates are right).

    Examples
    --------
    >>> import torch
    >>> check_normal_range(torch.full((1, 2), 1e-40), torch.ones(1, 2))
    Traceback (most recent call last):
    ...
    hesslens.errors.CurvatureUnderflowError: the curvature is below the normal range of ...
    """
    if out.numel() == 0 or not out.is_floating_point():
        return out
    return _check_range(out, V, *map(float, torch.aminmax(out)))


def _largest_abs(X: Tensor) -> float:
    """``max |X|`` in one pass without a temporary of ``X``'s size."""
    lo, hi = torch.aminmax(X)
    return max(-float(lo), float(hi))


def _check_range(out: Tensor, V: Tensor, lo: float, hi: float) -> Tensor:
    """:func:`check_normal_range` given ``out``'s smallest and largest entries."""
    tiny = torch.finfo(out.dtype).tiny
    top = max(-lo, hi)
    if top == 0.0 or top >= tiny:
        return out
    size = top / max(_largest_abs(V), tiny)
    if size >= tiny:
        return out
    raise CurvatureUnderflowError(
        f"the curvature is below the normal range of {str(out.dtype).removeprefix('torch.')} "
        f"(products of size {size:.2g} per unit input, smallest normal number {tiny:.2g}): "
        "its products are subnormal and have lost their precision; scale the loss up (e.g. "
        "multiply it by a power of 10 and divide the results by it) or analyse a float64 copy "
        "(dtype=torch.float64)"
    )


def matmat_as(
    op: SymmetricOperator,
    V: Tensor,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Multiply the batch ``V`` through ``op`` and return the product as ``dtype`` on ``device``.

    The vectors are cast to ``op.dtype`` (and moved to ``op.device``) only for the product; the
    result is checked for NaN/Inf (:func:`check_finite`) and its shape, and never shares
    memory with ``V`` (the algorithms update products in place); an operator below its dtype's
    normal range raises (:func:`check_normal_range`). ``device=None`` keeps the
    operator's device. This is the one place where the algorithms call ``op.matmat``.

    ``out`` (a tensor of ``V``'s shape, ``dtype`` on ``device``, not overlapping ``V``) receives
    the product and is returned: an operator with ``matmat_into(V, out)`` of that dtype and
    device sums its products there directly, so no product of its own is held beside it (one
    vector less); any other's product is copied into it.

    Examples
    --------
    >>> import torch
    >>> op = MatrixOperator(torch.diag(torch.tensor([2.0, 3.0])))
    >>> matmat_as(op, torch.ones(1, 2, dtype=torch.float64))
    tensor([[2., 3.]], dtype=torch.float64)
    """
    Vc = V.to(dtype=op.dtype, device=op.device)
    target = out
    into = getattr(op, "matmat_into", None)
    if (target is not None and into is not None and target.dtype == op.dtype
            and target.device == torch.device(op.device) and target.shape == V.shape):
        out = into(Vc, target)
    else:
        out = op.matmat(Vc)
    if not isinstance(out, Tensor) or out.shape != V.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise HesslensInputError(
            f"operator returned shape {shape} for a batch of shape {tuple(V.shape)}"
        )
    if out.numel():
        lo, hi = (float(x) for x in torch.aminmax(out))  # one pass for both checks
        if not (math.isfinite(lo) and math.isfinite(hi)):
            _raise_non_finite(out)
        _check_range(out, Vc, lo, hi)
    if target is not None:
        return target if out is target else target.copy_(out)
    out = out.to(dtype=dtype, device=op.device if device is None else device)
    if out.untyped_storage().data_ptr() in (
        Vc.untyped_storage().data_ptr(),
        V.untyped_storage().data_ptr(),
    ):  # the product is its input (an identity-like operator): the callers update it in place
        out = out.clone()
    return out


def matmat64(op: SymmetricOperator, V: Tensor) -> Tensor:
    """Multiply a batch through ``op`` and return float64 on ``op.device`` (internal helper).

    The vectors are cast to ``op.dtype`` only for the product; the algorithms keep their own
    arithmetic in float64. Non-finite products raise :class:`NonFiniteCurvatureError`.
    """
    return matmat_as(op, V, torch.float64)
