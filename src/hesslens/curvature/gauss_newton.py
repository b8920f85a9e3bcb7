"""The generalised Gauss-Newton matrix ``G = J^T H_z J``: ``J = dz/dθ`` the Jacobian of the
network's outputs ``z`` (``.logits`` of a ModelOutput), ``H_z = d2 L / dz2`` the loss's Hessian
in the outputs. Positive semi-definite for a loss convex in the outputs; ``H = G + R`` splits
the Hessian (:meth:`hesslens.curvature.hessian.Hessian.residual`).

One vector goes through the batch's kept graphs (``J v`` as the derivative of ``J^T u`` in a
dummy ``u``, ``H_z`` by double backward, ``J^T``: three reverse passes, no forward); several
are vmapped through ``jvp`` and ``vjp``, which is cheaper per vector. Two cases go through kept
graphs for every number of vectors: a causal LM's own loss through a chunked output layer
(``J`` to the head's inputs, ``J_head^T H_z J_head`` a chunk of tokens at a time:
:mod:`hesslens.curvature.lm_head`), and a model that checkpoints activations (``torch.func``
cannot run through it: :mod:`hesslens.curvature.checkpointing`).

Example:
    >>> import torch, hesslens as hl
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> G = hl.GaussNewton(net, torch.nn.functional.cross_entropy,
    ...                    (torch.randn(16, 3), torch.randint(0, 2, (16,))))
    >>> bool(G.eigenvalues(k=1, which="SA").values[0] > -1e-6)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from hesslens.curvature import lm_head, products
from hesslens.curvature.base import CurvatureOperator
from hesslens.curvature.checkpointing import is_torch_func_refusal
from hesslens.curvature.loop import WeightedBatch, split_flat


class GaussNewton(CurvatureOperator):
    """The generalised Gauss-Newton matrix ``G = J^T (d2 loss / d outputs2) J``."""

    def batch_products(self, batch: WeightedBatch, names: list[str], vectors: list[Tensor],
                       out: list[Tensor] | None = None) -> list[Tensor]:
        """``G_b V``, vmapped through ``jvp`` and ``vjp`` (one forward pass of the batch);
        through kept graphs for a chunked output layer or a checkpointing model."""
        model = self._shared.loop.model
        if batch.lm_head is None and not model.checkpointing:
            batch.check()
            try:
                return products.gauss_newton_vmapped(batch.outputs, batch.loss_of_outputs,
                                                     batch.params, names, vectors,
                                                     chunk_size=vectors[0].shape[0],
                                                     randomness=batch.randomness, out=out)
            except RuntimeError as err:
                if not is_torch_func_refusal(err):
                    raise
                model.checkpointing = True  # torch.func cannot run through it: kept graphs
        out = out if out is not None else [torch.zeros_like(v) for v in vectors]
        return _through_graph(batch, names, vectors, out)

    def _products(self, W: Tensor, out: Tensor | None = None) -> Tensor:
        loop = self._shared.loop
        if W.shape[0] > 1 or loop.graph_cache_bytes == 0:
            return super()._products(W, out)
        # one vector: through the kept graphs, no forward pass
        names = self._layout.names
        vs = split_flat(W, [self._layout.shapes[n] for n in names])
        return loop.sum(lambda batch, views: _through_graph(batch, names, vs, views), vs, out,
                        graph_kind="gauss_newton")


def _through_graph(batch: WeightedBatch, names: list[str], vectors: list[Tensor],
                   out: list[Tensor]) -> list[Tensor]:
    """``G_b V`` through the batch's kept graph, one vector at a time."""
    graph = batch.graph("gauss_newton", _graph)
    if isinstance(graph, lm_head.HeadGraph):
        tokens = graph.inputs.labels.numel()
        return lm_head.gauss_newton_rows(graph, names, vectors, batch.weight / max(tokens, 1),
                                         out)
    return products.gauss_newton_vp(graph, names, vectors, out=out)


def _graph(batch: WeightedBatch) -> products.GaussNewtonGraph | lm_head.HeadGraph:
    """The batch's Gauss-Newton graphs over every trainable parameter (shared by the blocks):
    to the head's inputs for a chunked output layer, else to the outputs."""
    batch.check()
    head = batch.lm_head
    if head is not None:
        return lm_head.head_graph(head, batch.model, batch.params, batch.trainable,
                                  batch.data)
    return products.gauss_newton_graph(batch.outputs, batch.loss_of_outputs, batch.params,
                                       batch.trainable)
