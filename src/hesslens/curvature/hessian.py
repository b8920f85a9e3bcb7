"""The Hessian of the mean loss, ``H = d2 L / dθ2``.

One batch's products go one of three ways (the *path*, :mod:`hesslens.curvature.paths`):

* ``"reverse"`` -- ``H v = d/dθ (g · v)`` by double backward on the batch's kept gradient graph
  (one vector at a time, or batched with ``is_grads_batched``);
* ``"forward"`` -- ``jvp(grad(L), v)``, forward over reverse, vmapped;
* ``"fd"`` -- finite differences of gradients (:func:`~hesslens.curvature.products.richardson_hvp`):
  no second-order autograd, so any kernel, compiled models, sharded parameters.

``path="auto"`` times the exact candidates on the first products of each shape (one vector,
several) and keeps the fastest (``H.engine_choice``); pin ``path=`` for bitwise-repeatable
products.

Example:
    >>> import torch, hesslens as hl
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> H = hl.Hessian(net, torch.nn.functional.cross_entropy,
    ...                (torch.randn(16, 3), torch.randint(0, 2, (16,))), path="reverse")
    >>> H.hvp(torch.randn(3, H.dim)).shape
    torch.Size([3, 26])
    >>> R = H.residual()                  # H - G, the Gauss-Newton split's other part
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from hesslens.curvature import products
from hesslens.curvature.base import CurvatureOperator
from hesslens.curvature.combinators import Difference
from hesslens.curvature.fisher import EmpiricalFisher
from hesslens.curvature.gauss_newton import GaussNewton
from hesslens.curvature.loop import WeightedBatch, split_flat
from hesslens.curvature.paths import PathChoice

#: Fewest vectors a chunk must hold for the batched paths to be timed against the loop.
MIN_BATCHED_CHUNK = 4


class Hessian(CurvatureOperator):
    """The Hessian of the mean loss with respect to the trainable parameters (or a block)."""

    @property
    def path_choice(self) -> PathChoice:
        """How products are computed: the path chosen per call shape, the timings that chose
        it and the products the timing spent (shared by every block)."""
        return self._shared.choice("hessian")

    @property
    def engine_choice(self) -> dict[str, str]:
        """The path chosen for single and batched products (after the first products)."""
        return dict(self.path_choice.chosen)

    def _products(self, W: Tensor, out: Tensor | None = None) -> Tensor:
        names = self._layout.names
        k = W.shape[0]
        shape = "batched" if k > 1 else "single"
        choice = self.path_choice
        candidates = self._candidates(k, names)
        if shape not in choice.chosen and len(candidates) > 1:
            # build the cached graphs first, so that their one-off cost is charged to no path
            self._shared.loop.build_graphs("hessian", self._graph)
        if out is None:
            out = W.new_zeros(W.shape, dtype=self._shared.loop.accumulate_dtype)
        return choice.products(shape, candidates, W,
                               lambda path, rows, out: self._run(path, names, rows, out), out)

    def _candidates(self, k: int, names: Sequence[str]) -> list[str]:
        """The paths worth timing for ``k`` vectors (one when pinned)."""
        path, loop = self._shared.path, self._shared.loop
        if path == "fd":
            return ["fd"]
        if path == "forward":
            return ["forward"]
        if path == "reverse":  # pinned: no timing, so products are bitwise repeatable
            return ["reverse-loop"]
        if k > 1 and loop.vectors_per_chunk(names) < MIN_BATCHED_CHUNK:
            # A chunk within product_bytes holds too few vectors for batching to pay, and
            # timing the batched paths would add their temporaries to the peak
            # (benchmarks/README.md, "Memory").
            return ["reverse-loop"]
        reverse = ["reverse-loop", "reverse-batched"] if k > 1 else ["reverse-loop"]
        if k == 1 and loop.model.device.type == "cpu" and (
                loop.graph_cache_bytes > 0 or loop.rows_per_chunk is not None):
            # On CPU a single double backward on a kept graph beats a single
            # forward-over-reverse product on every model tried (benchmarks/README.md), so do
            # not spend a product finding that out again; on batches split for memory it
            # holds less, too.
            return reverse
        return [*reverse, "forward"]

    def _run(self, path: str, names: Sequence[str], W: Tensor, out: Tensor) -> Tensor:
        """The products of the (m, width) ``W`` by ``path``, summed over the data into ``out``."""
        loop = self._shared.loop
        vs = split_flat(W, [self._layout.shapes[n] for n in names])
        if path == "fd":
            return loop.sum(lambda b, o: self._finite_differences(b, names, vs, o), vs, out)
        if path == "forward":
            chunk = loop.vectors_per_chunk(names)

            def forward(batch: WeightedBatch, o: list[Tensor]) -> None:
                batch.check()
                products.hvp_forward(batch.loss, batch.params, names, vs, chunk_size=chunk,
                                     randomness=batch.randomness, out=o)

            return loop.sum(forward, vs, out)
        batched = path == "reverse-batched"

        def reverse(batch: WeightedBatch, o: list[Tensor]) -> None:
            graph = batch.graph("hessian", self._graph)
            products.hvp_rows([graph.grads[n] for n in names], [graph.leaves[n] for n in names],
                              vs, batched=batched, chunk_size=loop.vectors_per_chunk(names),
                              out=o)

        return loop.sum(reverse, vs, out, graph_kind="hessian")

    @staticmethod
    def _graph(batch: WeightedBatch) -> products.FirstOrderGraph:
        """The batch's gradient graph over every trainable parameter, so that every block
        shares it; the gradient's values are not kept (products read only its graph)."""
        return products.first_order_graph(batch.loss, batch.params, batch.trainable,
                                          keep_values=False)

    def _finite_differences(self, batch: WeightedBatch, names: Sequence[str],
                            vs: list[Tensor], out: list[Tensor]) -> None:
        """``H_b v`` for each row by :func:`~hesslens.curvature.products.richardson_hvp`."""
        shared = self._shared
        base = {n: batch.params[n].detach() for n in names}
        theta_norm = products.norm(list(base.values()))
        for j in range(vs[0].shape[0]):
            v = [t[j] for t in vs]

            def gradient_at(t: float, v: list[Tensor] = v) -> list[Tensor]:
                moved = {n: base[n] + t * d for n, d in zip(names, v)}
                return products.gradient(batch.loss, moved, names)[1]

            hv = products.richardson_hvp(gradient_at, v, theta_norm=theta_norm,
                                         order=shared.fd_order, scale=shared.fd_scale)
            for o, h in zip(out, hv):
                o[j] += h.to(o.dtype)

    # ------------------------------------------------------------------ derived matrices
    def gauss_newton(self) -> GaussNewton:
        """The Gauss-Newton part ``G = J^T H_z J`` on the same parameters, data and cached
        graphs."""
        return self._sibling(GaussNewton)

    def residual(self) -> GaussNewtonResidual:
        """``H - G``, the other part of the Gauss-Newton split (each product costs a Hessian
        product and a Gauss-Newton product)."""
        return GaussNewtonResidual._from_terms([(1.0, self), (-1.0, self.gauss_newton())],
                                               self.label)

    def empirical_fisher(self) -> EmpiricalFisher:
        """The empirical Fisher ``(1/N) sum_n g_n g_n^T`` on the same parameters and data."""
        return self._sibling(EmpiricalFisher)


class GaussNewtonResidual(Difference):
    """The residual ``H - G`` of the Gauss-Newton split, built like any operator
    (``GaussNewtonResidual(model, loss_fn, data, **options)``, the options of
    :class:`~hesslens.curvature.base.CurvatureOperator`) or as ``H.residual()``."""

    def __init__(self, model: object, loss_fn: object, data: object, **options: object) -> None:
        hessian = Hessian(model, loss_fn, data, **options)
        super().__init__(hessian, hessian.gauss_newton(), label=hessian.label)
