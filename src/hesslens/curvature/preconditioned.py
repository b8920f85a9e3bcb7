"""A diagonally preconditioned curvature matrix: ``P^(-1/2) (A + S) P^(-1/2)``.

For a positive diagonal ``P`` the matrix ``P⁻¹ A`` is not symmetric, but it is similar to the
symmetric ``P^(-1/2) A P^(-1/2)``: the two have the same eigenvalues. This is the form in which
an adaptive optimizer sees the curvature (Adam: ``P = sqrt(v̂) + ε`` up to its bias
corrections; Cohen et al. 2022 compare ``λ1(P⁻¹ H)`` with Adam's edge of stability, see
:mod:`hesslens.analysis.thresholds`). The optional diagonal shift ``S`` adds a coupled weight
decay ``λ``: the optimizer then descends ``L + ½ λ |θ|²``, whose Hessian is ``H + λ I``.

:class:`Preconditioned` wraps any curvature operator (Hessian, Gauss-Newton, a layer block)
and is one itself: every estimator (``eigenvalues``, ``trace``, ``traces``, ``density``,
``dense``) runs on it. An entry ``P = ∞`` marks a coordinate the optimizer never moves; it
contributes zero rows and columns. Construction copies nothing of the model (it shares the
wrapped operator's private copy and data), so a new one for each optimizer state is cheap.

Example:
    >>> import torch, hesslens as hl
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> H = hl.Hessian(net, torch.nn.functional.cross_entropy,
    ...                (torch.randn(16, 3), torch.randint(0, 2, (16,))), dtype=torch.float64)
    >>> d = torch.rand(H.dim, dtype=torch.float64) + 0.5
    >>> A = Preconditioned(H, d)
    >>> ref = torch.linalg.eigvalsh(H.dense() / d.sqrt()[:, None] / d.sqrt()[None, :])
    >>> bool(torch.allclose(A.eigenvalues(k=1).values[0], ref[-1]))
    True
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hesslens.curvature.base import CurvatureOperator
from hesslens.curvature.blocks import Blocks, ParamSlice
from hesslens.errors import HesslensInputError

__all__ = ["Preconditioned"]

Diagonal = torch.Tensor | Mapping[str, torch.Tensor]


class Preconditioned(CurvatureOperator):
    """``P^(-1/2) (A + S) P^(-1/2)`` for a curvature operator ``A``, a positive diagonal ``P``
    and an optional diagonal shift ``S``.

    Args:
        op: the curvature operator ``A`` (a :class:`hesslens.CurvatureOperator`).
        diagonal: ``P``: a flat tensor of ``op.dim`` positive entries (``inf`` allowed: a
            coordinate that does not move), or ``{parameter name: tensor of its shape}`` for
            the parameters of ``op`` (what an optimizer's state gives).
        shift: ``S``: ``None``, a number, or a flat tensor / mapping like ``diagonal``.

    ``block``, ``gauss_newton``, ``residual`` and ``hessian`` return the preconditioned form of
    ``op``'s, with the same ``P`` and ``S``; ``loss_and_gradient`` returns ``P^(-1/2) g``, the
    gradient in the preconditioned coordinates ``x = P^(1/2) θ``.
    """

    def __init__(self, op: CurvatureOperator, diagonal: Diagonal,
                 shift: float | Diagonal | None = None) -> None:
        if not isinstance(op, CurvatureOperator):
            raise HesslensInputError(
                f"Preconditioned wraps a curvature operator (hl.Hessian, hl.GaussNewton, a "
                f"block), not {type(op).__name__}")
        self._attach(op._shared, op._blocks, op._layout.pieces, op.label)
        self.inner = op
        self._diagonal = self._by_name(diagonal, "diagonal")
        d = self.flat(self._diagonal)
        if bool(torch.isnan(d).any()) or bool((d <= 0).any()):
            raise HesslensInputError(
                "the preconditioner's diagonal must be positive (inf for a coordinate that "
                f"does not move); it has {int((torch.isnan(d) | (d <= 0)).sum())} entries that "
                "are zero, negative or NaN: add the optimizer's eps, or clamp it")
        self._scale = d.rsqrt().to(dtype=op.dtype, device=op.device)  # P^(-1/2); 0 where inf
        self._shift: dict[str, torch.Tensor] | None = None
        self._scaled_shift: torch.Tensor | None = None
        if shift is not None and not (isinstance(shift, (int, float)) and shift == 0):
            if isinstance(shift, (int, float)):
                shift = torch.full((op.dim,), float(shift), dtype=torch.float64)
            self._shift = self._by_name(shift, "shift")
            s = self.flat(self._shift).to(dtype=op.dtype, device=op.device)
            self._scaled_shift = torch.where(self._scale > 0, s * self._scale**2,
                                             torch.zeros_like(s))

    # ------------------------------------------------------------------ the diagonal
    def _by_name(self, values: Diagonal, what: str) -> dict[str, torch.Tensor]:
        """``values`` as ``{parameter name: tensor of its shape}`` (float64, CPU)."""
        layout = self._layout
        shapes = {n: layout.shapes[n] for n in layout.names}
        if isinstance(values, Mapping):
            missing = [n for n in layout.names if n not in values]
            if missing:
                raise HesslensInputError(
                    f"the {what} has no entry for the parameters {missing[:3]}"
                    f"{' ...' if len(missing) > 3 else ''}; give one tensor per parameter of "
                    "the operator (op.parameter_names)")
            out = {}
            for n in layout.names:
                v = torch.as_tensor(values[n]).detach().to("cpu", torch.float64)
                if v.shape != shapes[n]:
                    raise HesslensInputError(
                        f"the {what} of {n!r} has shape {tuple(v.shape)}, the parameter "
                        f"{tuple(shapes[n])}")
                out[n] = v
            return out
        flat = torch.as_tensor(values).detach().to("cpu", torch.float64)
        if flat.dim() != 1 or flat.numel() != self.dim:
            raise HesslensInputError(
                f"the {what} must be a flat tensor of the operator's {self.dim} entries or a "
                f"mapping of parameter names, got shape {tuple(flat.shape)}")
        width = torch.ones(layout.width, dtype=torch.float64)  # outside the pieces: unused
        if layout.identity:
            width = flat
        else:
            width[layout.index.cpu()] = flat
        pieces = torch.split(width, [shapes[n].numel() for n in layout.names])
        return {n: p.reshape(shapes[n]) for n, p in zip(layout.names, pieces)}

    def flat(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A per-parameter mapping as this operator's flat vector (float64, CPU)."""
        layout = self._layout
        width = torch.cat([values[n].reshape(-1) for n in layout.names])
        return width if layout.identity else width[layout.index.cpu()]

    @property
    def diagonal(self) -> torch.Tensor:
        """``P`` as a flat vector over this operator's elements (float64)."""
        return self.flat(self._diagonal)

    # ------------------------------------------------------------------ products
    def _apply(self, V: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``P^(-1/2) (A + S) P^(-1/2) V[i]`` (one product of ``A`` each; ``out`` is
        not used: the scaling makes a result of its own)."""
        out = self._scale * self.inner._apply(self._scale * V)
        if self._scaled_shift is not None:
            out = out + self._scaled_shift * V
        return out

    def loss_and_gradient(self) -> tuple[float, torch.Tensor]:
        """The mean loss and ``P^(-1/2) g``."""
        loss, grad = self.inner.loss_and_gradient()
        return loss, self._scale * grad

    # ------------------------------------------------------------------ derived operators
    def _wrap(self, op: CurvatureOperator) -> Preconditioned:
        return Preconditioned(op, self._diagonal, self._shift)

    def _restricted(self, blocks: Blocks, pieces: list[ParamSlice],
                    label: str) -> Preconditioned:
        return self._wrap(self.inner._restricted(blocks, pieces, label))

    def gauss_newton(self) -> Preconditioned:
        """The preconditioned Gauss-Newton part (of a preconditioned Hessian)."""
        return self._wrap(self.inner.gauss_newton())

    def residual(self) -> Preconditioned:
        """The preconditioned residual ``H - G`` (of a preconditioned Hessian)."""
        return self._wrap(self.inner.residual())

    def __repr__(self) -> str:
        return f"Preconditioned({self.inner!r})"
