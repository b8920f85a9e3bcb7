"""The empirical Fisher matrix ``F = sum_n w_n g_n g_n^T``: ``g_n`` the gradient of sample
``n``'s loss on its true label, ``w_n`` the sample's share of the loss terms (``1/N`` for ``N``
samples; for a language model's own loss, its label tokens over all of them).

Each sample's loss depends on the parameters through its own outputs ``z_n``, so
``g_n = J^T d_n`` with ``J = dz/dθ`` (the whole batch's Jacobian: exact with batch statistics
too) and ``d_n = dl_n/dz`` (zero outside row ``n``). The product needs no per-sample gradient:

    ``F v = J^T c``,  ``c_n = w_n d_n (d_n · (J v)_n)``,

a Gauss-Newton product whose output-space matrix is ``sum_n w_n d_n d_n^T`` instead of the
loss's Hessian in the outputs. ``J v`` comes from the derivative of ``J^T u`` in a dummy ``u``
(reverse mode only), so a product costs three reverse passes through the kept graph. For a
causal LM's own loss through a chunked output layer the samples' ``d_n . (J v)_n`` and ``J^T c``
run a chunk of tokens at a time (:func:`hesslens.curvature.lm_head.fisher_rows`).

Example:
    >>> import torch, hesslens as hl
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    >>> F = hl.EmpiricalFisher(net, torch.nn.functional.cross_entropy, (x, y))
    >>> grads = [torch.cat([g.flatten() for g in torch.autograd.grad(
    ...     torch.nn.functional.cross_entropy(net(x[n:n + 1]), y[n:n + 1]), net.parameters())])
    ...     for n in range(16)]
    >>> exact = sum(g.pow(2).sum() for g in grads) / 16
    >>> bool(torch.isclose(torch.as_tensor(F.trace(method="exact").value), exact, rtol=1e-5))
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hesslens.curvature import lm_head, products
from hesslens.curvature.base import CurvatureOperator
from hesslens.curvature.data import leading_size, take_rows
from hesslens.curvature.loop import WeightedBatch
from hesslens.errors import HesslensInputError


@dataclass
class FisherGraph:
    """One batch's graphs for Fisher products: the outputs (with their graph to the leaves),
    ``J^T u`` for a dummy ``u``, each sample's loss gradient in its outputs ``d`` (rows, zero
    for samples without a loss term) and the samples' weights ``w``."""

    leaves: dict[str, Tensor]
    outputs: Tensor
    u: Tensor
    jt_u: dict[str, Tensor | None]
    d: Tensor
    w: Tensor
    nbytes: int


class EmpiricalFisher(CurvatureOperator):
    """The empirical Fisher ``(1/N) sum_n g_n g_n^T`` of per-sample loss gradients (true
    labels), weighted by each sample's loss terms."""

    graph_kind = "fisher"

    def batch_products(self, batch: WeightedBatch, names: list[str], vectors: list[Tensor],
                       out: list[Tensor] | None = None) -> list[Tensor]:
        """``F_b V = J^T c`` with ``c_n = w_n d_n (d_n · (J v)_n)``, one vector at a time."""
        graph = batch.graph("fisher", self._graph)
        out = out if out is not None else [torch.zeros_like(v) for v in vectors]
        if isinstance(graph, lm_head.HeadGraph):
            return lm_head.fisher_rows(graph, names, vectors,
                                       self._shared.loop.data.num_terms, out)
        leaves = [graph.leaves[n] for n in names]
        rows = (-1,) + (1,) * (graph.d.dim() - 1)
        with products.second_order_kernels():
            for j in range(vectors[0].shape[0]):
                jv = products.jvp_reverse([graph.jt_u[n] for n in names], graph.u,
                                          [v[j] for v in vectors])
                if jv is None:
                    continue
                s = (graph.d * jv).flatten(1).sum(1) * graph.w
                c = graph.d * s.view(rows)
                for o, g in zip(out, products.vjp(graph.outputs, leaves, c)):
                    if g is not None:
                        o[j] += g
        return out

    def _graph(self, batch: WeightedBatch) -> FisherGraph | lm_head.HeadGraph:
        """Outputs, ``J^T u`` and the per-sample loss gradients of a batch, over every trainable
        parameter (shared by the blocks); checks that the batch's loss is the mean of its
        samples' losses. For a chunked output layer: the graph to the head's inputs."""
        batch.check()
        head = batch.lm_head
        if head is not None:
            return lm_head.head_graph(head, batch.model, batch.params, batch.trainable,
                                      batch.data)
        loop = batch._loop
        data = batch.data
        n = leading_size(data)
        terms = [loop.loss.terms(take_rows(data, slice(i, i + 1))) for i in range(n)]
        leaves = {name: batch.params[name].detach().requires_grad_(True)
                  for name in batch.trainable}
        with torch.enable_grad(), products.second_order_kernels(), \
                products.saved_bytes(batch.params.values()) as saved:
            outputs = batch.outputs(leaves)
            if outputs.dim() == 0 or outputs.shape[0] != n:
                raise HesslensInputError(
                    f"the empirical Fisher takes each sample's loss from its own row of the "
                    f"outputs, but the outputs have shape {tuple(outputs.shape)} for {n} "
                    "samples: the outputs must have the samples first")
            u = torch.zeros_like(outputs, requires_grad=True)
            jt_u = torch.autograd.grad(outputs, list(leaves.values()), u, create_graph=True,
                                       allow_unused=True)
            z = outputs.detach().requires_grad_(True)
            losses = [loop.loss.loss_of_outputs(z[i:i + 1], take_rows(data, slice(i, i + 1)))
                      if terms[i] > 0 else z.new_zeros(()) for i in range(n)]
            per_sample = torch.stack([loss.reshape(()) for loss in losses])
            d = torch.autograd.grad(per_sample.sum(), z, allow_unused=True)[0]
        d = torch.zeros_like(z) if d is None else d.detach()
        _check_mean_of_samples(loop.loss.loss_of_outputs(z.detach(), data), per_sample.detach(),
                               terms)
        w = torch.tensor(terms, dtype=z.dtype, device=z.device) / loop.data.num_terms
        return FisherGraph(leaves, outputs, u, dict(zip(leaves, jt_u)), d, w,
                           saved.nbytes + d.numel() * d.element_size())


def _check_mean_of_samples(batch_loss: Tensor, per_sample: Tensor, terms: list[int]) -> None:
    """Refuse a loss that is not the term-weighted mean of its samples' losses (class weights,
    a sum): the empirical Fisher of its samples would not be that loss's."""
    total = sum(terms)
    mean = float((per_sample.double() * torch.tensor(terms, dtype=torch.float64)).sum() / total)
    value = float(batch_loss)
    tol = max(1e-6, 64 * torch.finfo(per_sample.dtype).eps) * max(1.0, abs(value))
    if not math.isfinite(value) or abs(value - mean) > tol:
        raise HesslensInputError(
            f"the batch's loss ({value:.6g}) is not the mean of its samples' losses "
            f"({mean:.6g}, each sample's loss from its own outputs): the empirical Fisher needs "
            "a loss that averages per-sample terms (reduction='mean', no class weights)")
