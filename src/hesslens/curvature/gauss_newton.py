"""The generalised Gauss-Newton matrix ``G = J^T H_z J``: ``J = dz/dθ`` the Jacobian of the
network's outputs ``z`` (``.logits`` of a ModelOutput), ``H_z = d2 L / dz2`` the loss's Hessian
in the outputs. Positive semi-definite for a loss convex in the outputs; ``H = G + R`` splits
the Hessian (:meth:`hesslens.curvature.hessian.Hessian.residual`).

One vector goes through the batch's kept graphs (``J v`` as the derivative of ``J^T u`` in a
dummy ``u``, ``H_z`` by double backward, ``J^T``: three reverse passes, no forward); several
are vmapped through ``jvp`` and ``vjp``, which is cheaper per vector.

Example:
    >>> import torch, hesslens as hl
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> G = hl.GaussNewton(net, torch.nn.functional.cross_entropy,
    ...                    (torch.randn(16, 3), torch.randint(0, 2, (16,))))
    >>> bool(G.eigenvalues(k=1, which="SA").values[0] > -1e-6)
    True
"""

from __future__ import annotations

from torch import Tensor

from hesslens.curvature import products
from hesslens.curvature.base import CurvatureOperator
from hesslens.curvature.loop import WeightedBatch, split_flat


class GaussNewton(CurvatureOperator):
    """The generalised Gauss-Newton matrix ``G = J^T (d2 loss / d outputs2) J``."""

    def batch_products(self, batch: WeightedBatch, names: list[str], vectors: list[Tensor],
                       out: list[Tensor] | None = None) -> list[Tensor]:
        """``G_b V``, vmapped through ``jvp`` and ``vjp`` (one forward pass of the batch)."""
        batch.check()
        return products.gauss_newton_vmapped(batch.outputs, batch.loss_of_outputs,
                                             batch.params, names, vectors,
                                             chunk_size=vectors[0].shape[0],
                                             randomness=batch.randomness, out=out)

    def _products(self, W: Tensor) -> Tensor:
        loop = self._shared.loop
        if W.shape[0] > 1 or loop.graph_cache_bytes == 0:
            return super()._products(W)
        # one vector: through the kept graphs, no forward pass
        names = self._layout.names
        vs = split_flat(W, [self._layout.shapes[n] for n in names])

        def through_graph(batch: WeightedBatch, out: list[Tensor]) -> None:
            graph = batch.graph("gauss_newton", _graph)
            products.gauss_newton_vp(graph, names, vs, out=out)

        return loop.sum(through_graph, vs, graph_kind="gauss_newton")


def _graph(batch: WeightedBatch) -> products.GaussNewtonGraph:
    """The batch's Gauss-Newton graphs over every trainable parameter (shared by the blocks)."""
    batch.check()
    return products.gauss_newton_graph(batch.outputs, batch.loss_of_outputs, batch.params,
                                       batch.trainable)
