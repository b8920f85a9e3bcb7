"""Adapters that run hesslens and its peers the same way, for ``bench_core.py``.

Every tool gets its own deep copy of the model and the same ``(inputs, targets)`` batch and loss
module, is called with its own default settings, and has its Hessian-vector products counted by
us, not by the tool: each product is one vector multiplied by the Hessian (a batch of 8 vectors
is 8 products), including products a tool spends on set-up (hesslens's timing of its product
paths, curvlinops's determinism check).

* hesslens: ``hl.Hessian(model, loss_fn, (x, y))``, ``.eigenvalues(k)``, ``.trace()``.
* PyHessian 0.1: ``hessian(model, criterion, data=(x, y), cuda=False)``; power iteration with
  deflation for the top ``k`` (``maxIter=100, tol=1e-3``; it finds the largest-magnitude
  eigenvalues, negative ones included); Hutchinson for the trace (``maxIter=100, tol=1e-3``,
  stopping when the running mean changes by less than ``tol``). Products counted by wrapping
  ``hessian_vector_product``.
* hessian-eigenthings 1.0.0a5: ``HessianOperator(model, [(x, y)], supervised_loss(criterion))``
  with ``lanczos(op, k=k)`` (its defaults: ``max_iter=2k`` steps, ``which="LM"``) and
  ``trace(op)`` (Hutch++, 100 products requested). Products counted by wrapping ``op.matvec``.
  Every product rebuilds the first-order graph (one forward and backward, then the second
  backward): that is its design, not something we add.
* curvlinops 3.0.1: ``HessianLinearOperator(model, criterion, params, [(x, y)])`` and, as its
  documentation does, ``scipy.sparse.linalg.eigsh(H.to_scipy(), k=k, which="LA")`` with scipy's
  defaults (``tol=0``: machine precision). Its trace estimators have no default budget, so
  ``hutchpp_trace`` gets the number of products hesslens's own trace used (rounded up to a
  multiple of 3, as it requires). Products counted by wrapping ``HessianLinearOperator._matmat``
  (number of columns).

A tool that cannot be imported is reported once with the reason; one that fails on a task is
reported with the exception for that task; neither stops the benchmark.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.metadata
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

Data = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Answer:
    """What one tool returned for one task (values descending; products counted by us)."""

    values: list[float]
    products: int
    extra: dict[str, Any] = field(default_factory=dict)


class Counter:
    """Counts Hessian-vector products."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, k: int = 1) -> None:
        self.n += int(k)


@contextlib.contextmanager
def patched(owner: Any, attr: str, make: Callable[[Callable], Callable]) -> Iterator[None]:
    """Replace ``owner.attr`` by ``make(original)`` for the duration of the block."""
    original = getattr(owner, attr)
    setattr(owner, attr, make(original))
    try:
        yield
    finally:
        setattr(owner, attr, original)


def fresh(model: nn.Module) -> nn.Module:
    """A private deep copy of the model, gradients cleared (some peers leave graphs in .grad)."""
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.grad = None
    return m


def median_seconds(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def flat_params(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in flat_params(model))


def split_like(v: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    parts = torch.split(v, [p.numel() for p in params])
    return [c.reshape(p.shape).to(p.dtype) for c, p in zip(parts, params)]


class Tool:
    """One tool under test. ``load()`` imports it (raising with the reason if it cannot)."""

    name = "tool"
    distribution = ""
    module = ""

    def load(self) -> None:
        importlib.import_module(self.module)

    def version(self) -> str | None:
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    # Each returns an Answer; the caller times the call and catches failures.
    def top_eigenvalues(self, model: nn.Module, loss: nn.Module, data: Data, k: int,
                        hint: dict[str, Any]) -> Answer:
        raise NotImplementedError

    def trace(self, model: nn.Module, loss: nn.Module, data: Data,
              hint: dict[str, Any]) -> Answer:
        raise NotImplementedError

    def product_runner(self, model: nn.Module, loss: nn.Module, data: Data,
                       batch: int) -> Callable[[], Any]:
        """Set up (untimed), then return a callable that multiplies ``batch`` fixed random
        vectors by the Hessian the way this tool does (one call with the whole batch where
        the tool takes batches, else one call per vector)."""
        raise NotImplementedError


# --------------------------------------------------------------------------------- hesslens
class Hesslens(Tool):
    name = "hesslens"
    distribution = "hesslens"
    module = "hesslens"

    def __init__(self) -> None:
        self.last: Any = None  # the last operator built, for engine_choice and product timing

    def _operator(self, model, loss, data):
        import hesslens as hl

        H = hl.Hessian(fresh(model), loss, data)
        self.last = H
        return H

    @staticmethod
    def _products(H) -> tuple[int, int]:
        # n_products counts the vectors the estimators asked for; the engine's first batch of
        # each kind is also run on the other candidate paths to time them (calibration).
        calib = int(getattr(getattr(H, "path_choice", None), "calibration_products", 0))
        return int(H.n_products) + calib, calib

    def top_eigenvalues(self, model, loss, data, k, hint):
        H = self._operator(model, loss, data)
        res = H.eigenvalues(k=k)
        total, calib = self._products(H)
        return Answer(
            values=[float(v) for v in res.values],
            products=total,
            extra={"n_hvp": int(res.n_hvp), "calibration_products": calib,
                   "converged": bool(res.converged.all()),
                   "bounds": None if res.bounds is None else [float(b) for b in res.bounds],
                   "engine_choice": H.engine_choice},
        )

    def trace(self, model, loss, data, hint):
        H = self._operator(model, loss, data)
        res = H.trace()
        total, calib = self._products(H)
        return Answer(values=[float(res.value)], products=total,
                      extra={"stderr": float(res.stderr), "n_hvp": int(res.n_hvp),
                             "calibration_products": calib, "engine_choice": H.engine_choice})

    def product_runner(self, model, loss, data, batch):
        # Reuses the operator of the last estimate (its first-order graph is cached, as
        # PyHessian's is). The caller's untimed warm-up call makes hesslens time its candidate
        # product paths for this batch size and keep the fastest.
        H = self.last if self.last is not None else self._operator(model, loss, data)
        g = torch.Generator().manual_seed(1)
        V = torch.randn(batch, H.dim, generator=g)
        arg = V[0] if batch == 1 else V
        return lambda: H.hvp(arg)


# --------------------------------------------------------------------------------- PyHessian
class PyHessian(Tool):
    name = "pyhessian"
    distribution = "pyhessian"
    module = "pyhessian"

    @contextlib.contextmanager
    def _counting(self, counter: Counter):
        importlib.import_module("pyhessian")
        # pyhessian/__init__.py rebinds the name ``pyhessian.hessian`` to the class, so reach
        # the module through sys.modules; hessian.py calls its own imported name.
        ph = sys.modules["pyhessian.hessian"]

        def make(orig):
            def counted(gradsH, params, v):
                counter.add()
                return orig(gradsH, params, v)

            return counted

        with patched(ph, "hessian_vector_product", make):
            yield

    @staticmethod
    def _hessian(model, loss, data):
        from pyhessian import hessian

        return hessian(fresh(model), loss, data=data, cuda=False)

    def top_eigenvalues(self, model, loss, data, k, hint):
        counter = Counter()
        with self._counting(counter):
            h = self._hessian(model, loss, data)
            values, _ = h.eigenvalues(top_n=k)
        return Answer(values=sorted((float(v) for v in values), reverse=True),
                      products=counter.n,
                      extra={"settings": "maxIter=100, tol=1e-3", "which": "LM"})

    def trace(self, model, loss, data, hint):
        counter = Counter()
        with self._counting(counter):
            h = self._hessian(model, loss, data)
            samples = h.trace()
        return Answer(values=[float(np.mean(samples))], products=counter.n,
                      extra={"settings": "maxIter=100, tol=1e-3", "n_samples": len(samples)})

    def product_runner(self, model, loss, data, batch):
        from pyhessian.utils import hessian_vector_product

        h = self._hessian(model, loss, data)
        g = torch.Generator().manual_seed(1)
        vs = [split_like(torch.randn(n_params(h.model), generator=g), h.params)
              for _ in range(batch)]

        def run():
            for v in vs:
                hessian_vector_product(h.gradsH, h.params, v)

        return run


# ------------------------------------------------------------------------ hessian-eigenthings
class Eigenthings(Tool):
    name = "hessian-eigenthings"
    distribution = "hessian-eigenthings"
    module = "hessian_eigenthings"

    @staticmethod
    def _operator(model, loss, data, counter: Counter | None):
        import hessian_eigenthings as he

        op = he.HessianOperator(fresh(model), [data], he.supervised_loss(loss))
        if counter is not None:
            orig = op.matvec

            def counted(v):
                counter.add()
                return orig(v)

            op.matvec = counted
        return op

    def top_eigenvalues(self, model, loss, data, k, hint):
        import hessian_eigenthings as he

        counter = Counter()
        op = self._operator(model, loss, data, counter)
        res = he.lanczos(op, k=k)
        return Answer(values=sorted((float(v) for v in res.eigenvalues), reverse=True),
                      products=counter.n,
                      extra={"settings": "lanczos defaults: max_iter=2k, which=LM, tol=1e-4",
                             "which": "LM",
                             "converged": bool(res.converged.all()),
                             "iterations": int(res.iterations)})

    def trace(self, model, loss, data, hint):
        import hessian_eigenthings as he

        counter = Counter()
        op = self._operator(model, loss, data, counter)
        res = he.trace(op)
        return Answer(values=[float(res.estimate)], products=counter.n,
                      extra={"settings": "trace defaults: hutch++, num_matvecs=100",
                             "stderr": float(res.stderr)})

    def product_runner(self, model, loss, data, batch):
        op = self._operator(model, loss, data, None)
        g = torch.Generator().manual_seed(1)
        vs = [torch.randn(op.size, generator=g) for _ in range(batch)]

        def run():
            for v in vs:
                op.matvec(v)

        return run


# ----------------------------------------------------------------------------------- curvlinops
class Curvlinops(Tool):
    name = "curvlinops"
    distribution = "curvlinops-for-pytorch"
    module = "curvlinops"

    def load(self) -> None:
        # BackPACK declares torchvision; curvlinops's Hessian operator does not need it.
        from curvlinops import HessianLinearOperator, hutchpp_trace  # noqa: F401

    @contextlib.contextmanager
    def _counting(self, counter: Counter):
        from curvlinops import HessianLinearOperator

        def make(orig):
            def counted(self_, M):
                counter.add(M[0].shape[-1])
                return orig(self_, M)

            return counted

        with patched(HessianLinearOperator, "_matmat", make):
            yield

    @staticmethod
    def _operator(model, loss, data):
        from curvlinops import HessianLinearOperator

        m = fresh(model)
        return HessianLinearOperator(m, loss, flat_params(m), [data])

    def top_eigenvalues(self, model, loss, data, k, hint):
        from scipy.sparse.linalg import eigsh

        counter = Counter()
        with self._counting(counter):
            H = self._operator(model, loss, data)
            values = eigsh(H.to_scipy(), k=k, which="LA", return_eigenvectors=False)
        return Answer(values=sorted((float(v) for v in values), reverse=True),
                      products=counter.n,
                      extra={"settings": "scipy eigsh defaults (tol=0), which=LA; "
                                         "operator built with check_deterministic=True"})

    def trace(self, model, loss, data, hint):
        from curvlinops import hutchpp_trace

        budget = int(hint.get("products") or 99)
        budget = max(3, 3 * -(-budget // 3))
        counter = Counter()
        with self._counting(counter):
            H = self._operator(model, loss, data)
            dim = H.shape[0]
            if budget >= dim:
                budget = 3 * ((dim - 1) // 3)
            value = hutchpp_trace(H, num_matvecs=budget)
        return Answer(values=[float(value)], products=counter.n,
                      extra={"settings": f"hutchpp_trace(num_matvecs={budget}): no default "
                                         "budget, given hesslens's product count"})

    def product_runner(self, model, loss, data, batch):
        H = self._operator(model, loss, data)
        g = torch.Generator().manual_seed(1)
        M = torch.randn(H.shape[1], batch, generator=g)
        arg = M[:, 0] if batch == 1 else M
        return lambda: H @ arg


ALL_TOOLS: list[type[Tool]] = [Hesslens, PyHessian, Eigenthings, Curvlinops]
PEER_NAMES = [t.name for t in ALL_TOOLS[1:]]


# ------------------------------------------------- one product on any model (bench_transformers)
# The zoo's Hugging Face models take mapping batches ({"input_ids", "labels"} or
# {"pixel_values", "labels"}) and compute their own loss; the other models take (x, y) pairs and
# the cross-entropy. hesslens and hessian-eigenthings take the model as it comes; curvlinops and
# PyHessian need ``model(X)`` to be the tensor the loss module is applied to, so the Hugging Face
# models are wrapped (``Logits``) and the language model's labels are shifted and flattened.
PRODUCT_TOOLS = ("hesslens", "hesslens-fd", "curvlinops", "hessian-eigenthings",
                 "hessian-eigenthings-fd", "pyhessian")
NEEDS_DOUBLE_BACKWARD = ("curvlinops", "hessian-eigenthings", "pyhessian")
IGNORE = -100


class Logits(nn.Module):
    """``model(X)`` as a tensor: the logits of a Hugging Face model, for a language model
    without their last position and flattened to (tokens, vocab) to meet shifted labels."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, X: Any) -> torch.Tensor:
        x = X[self.key] if isinstance(X, dict) else X
        logits = self.model(**{self.key: x}).logits
        if self.key == "input_ids":
            logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        return logits


def _hf_key(batch: Any) -> str | None:
    return next((k for k in ("input_ids", "pixel_values") if isinstance(batch, dict)
                 and k in batch), None)


def _targets(batch: dict, key: str) -> torch.Tensor:
    y = batch["labels"]
    return y[:, 1:].reshape(-1) if key == "input_ids" else y


def _label_tokens(X: dict) -> int:
    return int((X["labels"][:, 1:] != IGNORE).sum())


def attention(math: bool) -> contextlib.AbstractContextManager:
    """PyTorch's math attention kernel (which has double backward and forward-mode AD) inside
    the block when ``math``; else nothing changes (the default fused kernels on CPU have
    neither)."""
    if not math:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def product_function(tool: str, model: nn.Module, loss_fn: Any, batches: list,
                     math: bool = False) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """Set up ``tool`` on a private copy of ``model`` and return ``(v -> H v, how)``: one
    Hessian-vector product of a flat float vector in the tool's own way, and a line saying
    how the tool was called (the wrapping it needed). ``loss_fn`` is the zoo's (``None``: the
    model's own loss). ``math``: construction and products under the math attention kernel."""
    m = fresh(model)
    key = _hf_key(batches[0])
    with attention(math):
        if tool in ("hesslens", "hesslens-fd"):
            import hesslens as hl

            path = "fd" if tool == "hesslens-fd" else "auto"
            H = hl.Hessian(m, loss_fn, batches, path=path)
            return H.hvp, f"hl.Hessian(model, loss_fn, batches, path={path!r}).hvp(v)"
        if tool.startswith("hessian-eigenthings"):
            import hessian_eigenthings as he

            method = "finite_difference" if tool.endswith("-fd") else "autograd"
            lf = he.hf_lm_loss() if key else he.supervised_loss(nn.CrossEntropyLoss())
            op = he.HessianOperator(m, batches, lf, method=method)
            lname = "hf_lm_loss()" if key else "supervised_loss(CrossEntropyLoss())"
            how = f"HessianOperator(model, batches, {lname}, method={method!r}).matvec(v)"
        elif tool == "curvlinops":
            from curvlinops import HessianLinearOperator

            f = Logits(m, key) if key else m
            crit = nn.CrossEntropyLoss(ignore_index=IGNORE)
            if key == "input_ids":
                data = [(b, _targets(b, key)) for b in batches]
                size_fn: Callable | None = _label_tokens
                how = ("HessianLinearOperator(Logits(model) [shifted, flattened logits], "
                       "CrossEntropyLoss(ignore_index=-100), params, [(batch dict, shifted "
                       "labels)], batch_size_fn=<label tokens>) @ v")
            elif key:
                data, size_fn = [(b[key], b["labels"]) for b in batches], None
                how = ("HessianLinearOperator(Logits(model), CrossEntropyLoss(), params, "
                       "[(pixel_values, labels)]) @ v")
            else:
                data, size_fn = list(batches), None
                how = "HessianLinearOperator(model, CrossEntropyLoss(), params, [(x, y)]) @ v"
            op = HessianLinearOperator(f, crit, flat_params(f), data, batch_size_fn=size_fn)
        elif tool == "pyhessian":
            from pyhessian import hessian
            from pyhessian.utils import hessian_vector_product

            if len(batches) != 1:
                raise ValueError("PyHessian's data= takes one (x, y) batch")
            b = batches[0]
            f = Logits(m, key) if key else m
            x, y = (b[key], _targets(b, key)) if key else b
            h = hessian(f, nn.CrossEntropyLoss(ignore_index=IGNORE), data=(x, y), cuda=False)
            how = (("hessian(Logits(model) [shifted, flattened logits for the LM], "
                    "CrossEntropyLoss(ignore_index=-100), data=(x, y)); "
                    if key else "hessian(model, CrossEntropyLoss(), data=(x, y)); ")
                   + "hessian_vector_product(h.gradsH, h.params, v)")

            def run_pyhessian(v: torch.Tensor) -> torch.Tensor:
                with attention(math):
                    hv = hessian_vector_product(h.gradsH, h.params, split_like(v, h.params))
                return torch.cat([t.reshape(-1) for t in hv])

            return run_pyhessian, how
        else:
            raise ValueError(f"unknown tool {tool!r}")

    def run(v: torch.Tensor) -> torch.Tensor:
        with attention(math):
            if tool == "curvlinops":
                return op @ v
            return op.matvec(v)

    return run, how
