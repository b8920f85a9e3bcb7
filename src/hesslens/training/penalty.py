r"""Hessian trace regularization (HTR): a differentiable Hessian-trace estimate as a loss term.

Sankar et al. (AAAI 2021) add ``gamma * tr(H)`` to the training loss, with the trace estimated by
Hutchinson's method: for probes ``v`` with ``E[v v^T] = I`` (Rademacher or Gaussian),
``E[v^T H v] = tr(H)``. :class:`HessianTracePenalty` returns

.. math::
    P(\theta) = \frac{1}{m} \sum_{i=1}^{m} v_i^\top H_{SS}(\theta)\, v_i,
    \qquad \mathbb{E}[P] = \sum_{l \in S} \operatorname{tr}(H_{ll}),

where ``S`` is the set of chosen layers and ``H_SS`` the Hessian of the loss with respect to
those layers' parameters only (``v`` is zero outside ``S``, so only the diagonal blocks
``H_ll`` of the chosen layers enter the expectation). ``P`` is an ordinary differentiable
scalar: add ``gamma * P`` to the loss and call ``backward()``; its gradient reaches every
parameter of the model (the curvature of the middle layers depends on the first layers too), so
it works unchanged with any optimizer, learning-rate schedule, gradient accumulation or
mixed-precision scaler.

Three curvatures
----------------
``curvature="hessian"`` (the default, the paper) is the above. The Hessian is indefinite: its
trace can be negative (BatchNorm in training mode, saddle regions), and then minimising it
rewards *more* negative curvature instead of flatness. The penalty keeps the last 50 values and
warns once (:class:`NegativeCurvatureWarning`) when their mean is below zero by more than three
standard errors (judged from 10 values on). Two positive semi-definite alternatives
(:mod:`hesslens.training.penalty_curvature`), for outputs ``z``, batch-mean loss
``L = ell(z) = (1/N) sum_i l_i`` and ``H_z = d2 ell / dz2``:

* ``"gauss_newton"``: ``E[P] = tr(J_S^T H_z J_S)``, the chosen diagonal blocks of the
  Gauss-Newton matrix ``G = J^T H_z J`` (``J = dz / dtheta``; ``H = G + sum_k (dell/dz_k)
  d2 z_k / dtheta2``). For softmax cross-entropy (class indices or probability targets, no
  class weights) and mean squared error, ``H_z = S S^T`` in closed form
  (:func:`~hesslens.training.penalty_curvature.output_sqrt_hessian`) and the probes live in the
  output space: ``P = mean_u ||J_S^T S u||^2`` (one reverse pass per probe, never negative).
  Any other ``loss_fn`` takes parameter-space probes, ``P = mean_v (J_S v)^T H_z (J_S v)``
  (``J v`` as the ``u``-derivative of ``J^T u``: two reverse passes and an output-sized one).
  On the MNIST-1D CNN the spread of one probe is the same for both (26-27 % of the mean).
* ``"fisher"``: ``P = (1/N) sum_i ||d l_i / dtheta_S||^2``, the trace of the chosen blocks of
  the empirical Fisher ``(1/N) sum_i g_i g_i^T`` with the true labels, computed exactly (no
  probes: ``n_probes`` and ``distribution`` are unused) from per-sample gradients
  (``torch.func.vmap(grad)``; memory ``N`` times the chosen parameters). ``l_i`` is
  ``loss_fn`` on the batch of sample ``i`` alone, so the loss must be a batch mean: a batch
  loss other than ``mean_i l_i`` (a sum, class weights, ignored labels) is refused by name.
  With BatchNorm in training mode a sample's loss depends on the whole batch; ``l_i`` is then
  the ``i``-th loss term of one pass over the batch and ``g_i`` its gradient through the batch
  statistics (``sum_i g_i = N grad L`` still), from a reverse pass vmapped over the ``N``
  terms: ``N`` times a backward pass's arithmetic, so far slower. Jastrzebski et al. (ICML
  2021) define ``tr(F)`` with labels sampled from the model and regularise with a mini-batch
  estimate of it; this is the true-label (empirical) variant, exact on the batch, not the
  squared norm of the batch-mean gradient.

Both re-evaluate the model on the batch (``loss_fn`` at construction, ``pen(loss, inputs=x,
targets=y)``), with normalisation written out (:mod:`hesslens.training.norms`), running
statistics and the random-number stream untouched; ``method="fd"`` is for the Hessian only.

Two ways to compute the Hessian's
---------------------------------
``method="hvp"`` (exact quadratic forms, double back-propagation)::

    g   = autograd.grad(loss, theta_S, create_graph=True)     # first-order graph kept
    Hv  = autograd.grad(g . v, theta_S, create_graph=True)    # Hessian-vector product
    P   = mean over probes of  v . Hv

Both ``grad`` calls differentiate with respect to the chosen layers' parameters only, so the
backward passes stop at the first chosen layer and skip the weight gradients of the others:
``layers="middle"`` is cheaper than ``layers="all"`` (the authors' code zeroed the probe outside
the middle layers but still differentiated through every parameter, so it saved nothing).

``method="fd"`` (no double backward): the second derivative of the loss along ``v`` by a
symmetric finite difference,

.. math::
    v^\top H v \approx \frac{L(\theta + \varepsilon v) - 2 L(\theta) + L(\theta - \varepsilon v)}
    {\varepsilon^2},

with ``L(theta)`` the loss passed in and the two perturbed losses evaluated with
``torch.func.functional_call`` on ``theta_S + eps v`` (differentiable with respect to the
parameters; only the chosen layers are moved). It needs the batch: call
``pen(loss, inputs=x, targets=y)`` and give ``loss_fn`` at construction. Cost: two extra
forward passes and their ordinary first-order backward (see "Cost" below).

Error of the finite difference. With ``phi(t) = L(theta + t v)``,

* truncation: ``(phi(e) - 2 phi(0) + phi(-e)) / e^2 = phi''(0) + e^2 phi''''(0) / 12 + O(e^4)``,
  a bias proportional to the fourth derivative along the probe;
* round-off: each loss carries a relative rounding error of order ``u`` (unit round-off,
  ``2^-24 ~ 6e-8`` in float32, ``2^-53 ~ 1.1e-16`` in float64) so the numerator carries an
  absolute error of about ``4 u |L|`` and the estimate ``4 u |L| / e^2``.

Step size. The step is set relative to the size of the chosen parameters: the parameter
perturbation ``e v`` has norm ``fd_eps * ||theta_S||``, i.e.
``e = fd_eps * ||theta_S|| / ||v||``. On the scale of the weights a network's curvature changes
over distances comparable to ``||theta||`` (rescaling all weights by a factor ``c`` changes the
logits by a power of ``c``), so ``phi'''' / phi'' ~ (||v|| / ||theta||)^2``: the relative
truncation error is about ``fd_eps^2 / 12``, while the relative round-off error is about
``4 u |L| / (fd_eps^2 ||theta||^2 h)`` with ``h = phi''(0) / ||v||^2`` the curvature along the
unit probe direction, of order ``|L| / ||theta||^2`` by the same scaling argument. Balancing
``fd_eps^2 / 12`` against ``4 u / fd_eps^2`` gives ``fd_eps ~ (48 u)^(1/4)``: ``0.041`` in float32
and ``2.7e-4`` in float64. The default (``fd_eps=None``) is ``(48 u)^(1/4)`` for the dtype of the
parameters. Measured on MNIST-1D (batch 128, softplus versions of the zoo's MLP and 1-D CNN, one
Rademacher probe, against float64 double backward): in float32 the relative error of one
quadratic form is 60 % / 6 % / 2 % / 0.5 % (median over probes; at most 1.6 %) at
``fd_eps`` = 0.003 / 0.01 / 0.02 / 0.041, and 0.6 % at 0.08; random-direction curvature is
smaller than ``|L| / ||theta||^2`` there, which makes round-off the larger term, so smaller steps
are worse. In float64 the error is 1e-6 at ``fd_eps`` = 1e-4..1e-3 and 1e-3 at 0.041. Either way
it is far below the Hutchinson noise of one probe (relative standard deviation
``sqrt(2 sum_{i!=j} H_ij^2) / tr(H)``, typically tens of percent).

Piecewise-linear networks (ReLU, max-pooling). There the loss is not twice differentiable:
where a unit crosses its kink the slope jumps, which the exact (almost-everywhere) Hessian
ignores and the finite difference does not. The finite difference then estimates the curvature
of the loss smoothed over the step (the distributional second derivative, kinks included), not
``v^T H v``: on the zoo's ReLU MLP for MNIST-1D the two differ by 100 % to 500 % (median over
probes) for every ``fd_eps`` from 1e-4 to 0.04, in float64 as in float32, and agree only below
``fd_eps ~ 1e-5``, when hardly any unit crosses its kink. The penalty's gradient, a second
difference of gradients that jump at the kinks, is then heavy-tailed: LeNet-5 on random 32x32
inputs (batch 64, gamma 1e-3, SGD lr 0.01, momentum 0.9) diverged within 12 steps with ``"fd"``
and not with ``"hvp"``. So for ReLU networks ``"fd"`` regularises finite-step sharpness, not
``tr(H)``, and may need a smaller gamma; a warning says so once. Use ``"hvp"`` where the trace
itself matters, or smooth activations.

Normalisation layers. PyTorch's fused BatchNorm (batch statistics), InstanceNorm and LayerNorm
kernels give wrong third derivatives without an error (see :mod:`hesslens.training.norms`), and
the gradient of ``"hvp"`` is one. When the loss's graph runs through one of them, the penalty
re-evaluates the loss on the same batch with those layers written out in primitive operations
(one extra forward pass; running statistics and the random-number stream untouched), so it needs
``pen(loss, inputs=x, targets=y)`` and ``loss_fn``, and says so otherwise. ``"fd"`` uses first
derivatives only and is not affected.

The forward pass must be a deterministic function of the parameters for ``"fd"`` (no active
dropout: the three losses would see different masks; a warning is given). Both perturbed passes
run under the same random-number state, which is restored afterwards, and BatchNorm running
statistics are not touched (the perturbed passes run on copies of the buffers).

Cost
----
Measured with ``python benchmarks/bench_training.py`` (one CPU thread, one probe, batch 128;
MNIST-1D MLP and 1-D CNN, a 5-layer MLP, LeNet-5), one step with the penalty against one plain
SGD step: ``"hvp"`` 5-6x, ``"fd"`` 3-3.6x, ``layers="middle"`` 0.4-0.8x the all-layer cost.
Both have floors that no implementation detail removes:

* ``"fd"``: the gradient of the symmetric second difference is
  ``(g(theta + e v) - 2 g(theta) + g(theta - e v)) / e^2`` (``g`` the loss gradient): two
  gradient evaluations besides the one the SGD step makes anyway, so about three SGD steps less
  the optimizer update's share. A one-sided difference ``2 (g(theta + e v) - g(theta)) / e^2``
  would need one extra gradient and has the right expectation, but carries the zero-mean term
  ``2 H v / e``, about ``1 / fd_eps`` (~25) times the signal: it is not offered.
* ``"hvp"``: the penalty's gradient ``D^3 L[v, v, .]`` is a third derivative; double backward
  for ``H v`` and one more backward through both graphs cost 5-6 SGD steps here. The forward-mode
  alternatives (forward-over-reverse for ``H v``, or forward-over-forward for ``v^T H v``, then
  reverse) were no faster overall in PyTorch 2.13: 0.8-2.4x the double-backward time, depending
  on the model and the run.
  Evaluating the penalty on half the batch saved little on the small models (per-operation
  overhead dominates them: MNIST-1D CNN 5.9x to 4.9x, MLP unchanged) while raising the relative
  spread of the estimate by 10-100 %, so the penalty always uses the whole batch.

The other curvatures, in passes over the batch besides the SGD step's forward and backward:
``"gauss_newton"`` (cross-entropy, MSE) one forward, one reverse pass kept for differentiation
and its double backward; with parameter-space probes one more reverse pass and its backward;
``"fisher"`` a vmapped forward and backward for the per-sample gradients and the double
backward through them (``python benchmarks/bench_penalty_curvature.py`` measures all three).

Use ``every`` (the trainer's ``htr_every``) to amortise: at the paper's schedule, one penalised
step in 50, every arm costs 1.02-1.11x SGD.

Probes are drawn from a ``torch.Generator`` seeded with ``seed``; the generator's state is part
of :meth:`HessianTracePenalty.state_dict`, so a resumed training run draws the same probes.

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
    ...                       nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> pen = HessianTracePenalty(model, layers="middle", n_probes=2, seed=0)
    >>> pen.layers
    ['2', '4']
    >>> loss = nn.functional.cross_entropy(model(x), y)
    >>> total = loss + 1e-3 * pen(loss)
    >>> total.backward()
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hesslens.checks import SEED_LIMIT, check_seed
from hesslens.curvature.blocks import block_parameters
from hesslens.curvature.products import named_derivative_errors, second_order_kernels
from hesslens.errors import HesslensInputError
from hesslens.training.layers_select import select_blocks
from hesslens.training.norms import DecomposedNorms, fused_norms_in_graph
from hesslens.training.penalty_curvature import (
    batch_statistics_modules,
    coupled_fisher_trace,
    empirical_fisher_trace,
    gauss_newton_forms,
    gauss_newton_output_forms,
    output_sqrt_hessian,
)

__all__ = ["HessianTracePenalty", "NegativeCurvatureWarning", "default_fd_eps"]

_DISTRIBUTIONS = ("rademacher", "gaussian")
_NO_DOUBLE_BACKWARD = (
    "the penalty differentiates the training loss twice; compute that loss under "
    "torch.nn.attention.sdpa_kernel(SDPBackend.MATH) (PyTorch's fused attention kernels have "
    "no double backward), or use method='fd'")
_METHODS = ("hvp", "fd")
_CURVATURES = ("hessian", "gauss_newton", "fisher")


#: How many recent Hessian penalty values the negative-curvature check averages, and how many it
#: needs before it judges.
_RECENT, _RECENT_MIN = 50, 10


class NegativeCurvatureWarning(UserWarning):
    """The running mean of a Hessian-trace penalty is significantly below zero: the penalty then
    rewards negative curvature (it lowers the loss by making it more concave)."""


def default_fd_eps(dtype: torch.dtype) -> float:
    """The default relative finite-difference step ``(48 u)^(1/4)``, ``u`` the unit round-off.

    Example:
        >>> round(default_fd_eps(torch.float32), 3), f"{default_fd_eps(torch.float64):.1e}"
        (0.041, '2.7e-04')
    """
    u = torch.finfo(dtype).eps / 2.0
    return (48.0 * u) ** 0.25


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, Tensor):
        raise HesslensInputError(
            f"the penalty needs the loss as a torch.Tensor, got {type(loss).__name__}; "
            "pass the scalar returned by the loss function"
        )
    if loss.numel() != 1:
        raise HesslensInputError(
            f"the loss must be a scalar, got shape {tuple(loss.shape)}; reduce it first "
            "(e.g. loss_fn with reduction='mean')"
        )
    if not loss.requires_grad:
        raise HesslensInputError(
            "the loss does not require grad (computed under torch.no_grad(), or the model has "
            "no trainable parameters); compute it with autograd enabled"
        )
    value = float(loss.detach().reshape(()).item())
    if not math.isfinite(value):
        raise HesslensInputError(
            f"the loss is not finite ({value}); the Hessian trace is undefined "
            "there: lower the learning rate or check the data"
        )


def _derived_seed(seed: int, draws: int) -> int:
    """A seed for the probe stream after ``draws`` probes, for a generator that cannot take
    the old one's state (another kind of device)."""
    return (seed * 6364136223846793005 + (draws + 1) * 1442695040888963407) % (2**63)


def _slice_masks(model: nn.Module, blocks: Mapping[str, Sequence[Any]],
                 names: Sequence[str]) -> list[Tensor | None] | None:
    """Per chosen parameter, a 0/1 mask of the elements the blocks cover (``None``: all of
    them); ``None`` when every block takes whole parameters."""
    params = dict(model.named_parameters())
    covered: dict[str, list[Any]] = {n: [] for n in names}
    for pieces in blocks.values():
        for piece in pieces:
            covered[piece.param].append(piece)
    masks: list[Tensor | None] = []
    for n in names:
        if any(piece.dim is None for piece in covered[n]):
            masks.append(None)
            continue
        mask = torch.zeros(params[n].numel())
        for piece in covered[n]:
            mask[piece.flat_indices(params[n].shape)] = 1.0
        masks.append(mask.view(params[n].shape))
    return None if all(m is None for m in masks) else masks


def _slot(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module owning the parameter or buffer ``name``, and its attribute name there."""
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def _stat_buffer_slots(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Normalisation-statistics buffers a training-mode forward pass updates in place."""
    out = []
    for mod_name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            for b_name, b in m.named_buffers(recurse=False):
                if b is not None:
                    out.append((f"{mod_name}.{b_name}" if mod_name else b_name, m, b_name))
    return out


def _perturbation_slots(model: nn.Module, chosen: Sequence[str]) -> list[tuple[str, int]]:
    """``(name, i)`` for every distinct slot holding the ``i``-th chosen parameter.

    A parameter shared by two modules (``b.weight = a.weight``) appears under both names, so a
    functional call moves both uses; a module registered twice (``self.again = self.layer``)
    appears once, since replacing the attribute of that one module moves both uses and a second
    name would make ``functional_call`` restore the wrong tensor afterwards. The slots are passed
    to ``functional_call(..., tie_weights=False)``, which then has nothing left to re-tie.
    """
    named = dict(model.named_parameters())
    index = {id(named[n]): i for i, n in enumerate(chosen)}
    slots, seen = [], set()
    for name, param in model.named_parameters(remove_duplicate=False):
        module, attr = _slot(model, name)
        key = (id(module), attr)
        if key in seen or id(param) not in index:
            continue
        seen.add(key)
        slots.append((name, index[id(param)]))
    return slots


class HessianTracePenalty:
    """A differentiable Hutchinson estimate of the chosen layers' Hessian-block traces.

    Args:
        model: the network whose loss is penalised.
        layers: ``"all"``, ``"middle"`` (layers with index ``round(n/4) .. round(3n/4)``, half-up,
            end excluded, of the ``n`` layers in forward order; see
            :func:`hesslens.curvature.layers.middle_indices`), or a
            list of layer names (a comma-separated string works too). A layer is a module that
            owns trainable parameters directly, or a block of ``grouping``; ``layers`` may also
            be a grouping itself (a preset such as ``"transformer"``, or a mapping of glob
            patterns / ParamSlices): all its blocks.
        n_probes: number of probes averaged per call.
        distribution: ``"rademacher"`` (entries +-1: lowest variance) or ``"gaussian"``.
        method: ``"hvp"`` (double back-propagation, exact quadratic forms) or ``"fd"``
            (symmetric finite differences of the loss, first-order only).
        fd_eps: relative step for ``"fd"``: the parameters move by ``fd_eps * ||theta_S||``
            along each probe. ``None`` takes :func:`default_fd_eps` of the parameters' dtype.
        seed: seed of the probe generator, in ``[0, 2**32)`` (:func:`hesslens.checks.check_seed`);
            ``None`` draws one from the global torch generator once, at construction (so
            ``torch.manual_seed`` still makes runs reproducible).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; required for ``"fd"``.
        grouping: the blocks ``layers`` chooses among, as the curvature operators'
            ``layers=`` (:func:`hesslens.curvature.blocks.resolve_blocks`): ``None`` (modules),
            ``"transformer"`` (q, k, v, o, mlp_in, mlp_out per layer: q of a fused QKV weight
            is a slice, and the probe is zero outside it), or a mapping.
        curvature: the matrix whose chosen diagonal blocks' trace is penalised: ``"hessian"``
            (the paper; warns with :class:`NegativeCurvatureWarning` once its running estimate
            is significantly negative), ``"gauss_newton"`` (``J^T H_z J``, Hutchinson forms
            ``(J v)^T H_z (J v)``, never negative for a loss convex in the outputs) or
            ``"fisher"`` (the empirical Fisher ``(1/N) sum_i ||grad l_i||^2``, exact: no
            probes). Both need ``loss_fn`` and ``pen(loss, inputs=x, targets=y)``; see
            :mod:`hesslens.training.penalty_curvature`.

    Call ``pen(loss)`` (``"hvp"``) or ``pen(loss, inputs=x, targets=y)`` (``"fd"`` and the other
    curvatures; ``loss`` must be ``loss_fn(model(x), y)``) to get the penalty, a scalar tensor to
    be added to the loss.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str] = "all",
        n_probes: int = 1,
        distribution: str = "rademacher",
        method: str = "hvp",
        fd_eps: float | None = None,
        seed: int | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        grouping: str | Mapping[str, Any] | None = None,
        *,
        curvature: str = "hessian",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise HesslensInputError(
                f"model must be a torch.nn.Module, got {type(model).__name__}"
            )
        if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
            raise HesslensInputError(f"n_probes must be a positive integer, got {n_probes!r}")
        if distribution not in _DISTRIBUTIONS:
            raise HesslensInputError(
                f"unknown probe distribution {distribution!r}; use one of {list(_DISTRIBUTIONS)}"
            )
        if method not in _METHODS:
            raise HesslensInputError(
                f"unknown method {method!r}; use 'hvp' (double backward) or 'fd' (finite "
                "differences)"
            )
        if curvature not in _CURVATURES:
            raise HesslensInputError(
                f"unknown curvature {curvature!r}; use one of {list(_CURVATURES)}")
        if curvature != "hessian" and method != "hvp":
            raise HesslensInputError(
                f"method={method!r} is for curvature='hessian' only; curvature={curvature!r} "
                "uses exact derivatives (leave method='hvp')")
        if curvature != "hessian" and loss_fn is None:
            raise HesslensInputError(
                f"curvature={curvature!r} re-evaluates the model on the batch and needs "
                "loss_fn(outputs, targets): pass loss_fn= to HessianTracePenalty")
        if fd_eps is not None and not (math.isfinite(fd_eps) and fd_eps > 0):
            raise HesslensInputError(f"fd_eps must be a positive finite number, got {fd_eps!r}")
        if seed is not None:
            seed = check_seed(seed)
        if loss_fn is not None and not callable(loss_fn):
            raise HesslensInputError("loss_fn must be callable: loss_fn(outputs, targets)")
        self.model = model
        self.blocks = select_blocks(model, layers, grouping)
        self.layer_params: dict[str, list[str]] = block_parameters(self.blocks)
        self.layers: list[str] = list(self.blocks)
        self.param_names: list[str] = list(dict.fromkeys(
            n for ns in self.layer_params.values() for n in ns))
        # Blocks that are slices of a parameter (q of a fused QKV weight): the probe is zero
        # outside the slice, so v^T H v estimates the trace of the slice's block alone.
        self._masks = _slice_masks(model, self.blocks, self.param_names)
        # (module, attribute) of each chosen parameter: a lookup per call that stays right after
        # model.to(), without walking named_parameters() on every training step.
        self._param_slots = [_slot(model, n) for n in self.param_names]
        self._stat_slots = _stat_buffer_slots(model)
        # Every (module, attribute) slot that holds a chosen parameter, for the perturbed
        # passes of "fd": a parameter shared by two modules is moved in both.
        self._fd_slots = _perturbation_slots(model, self.param_names)
        self._dropouts = [m for m in model.modules()
                          if isinstance(m, nn.modules.dropout._DropoutNd)]
        self.curvature = curvature
        self.n_probes = n_probes
        self.distribution = distribution
        self.method = method
        self.fd_eps = fd_eps
        self.loss_fn = loss_fn
        if seed is None:
            seed = int(torch.randint(0, SEED_LIMIT, (1,)).item())
        self.seed = int(seed)
        self._generator: torch.Generator | None = None
        self._pending_state: Tensor | None = None
        self._pending_device = "cpu"
        self._draws = 0  # probes drawn so far
        self._warned_dropout = False
        self._warned_kinks = False
        self._warned_negative = False
        self._warned_coupled = False
        self._recent: deque[float] = deque(maxlen=_RECENT)
        self.last_fd_steps: list[float] = []

    # ------------------------------------------------------------------ helpers
    def __repr__(self) -> str:
        return (
            f"HessianTracePenalty(layers={self.layers}, curvature={self.curvature!r}, "
            f"n_probes={self.n_probes}, "
            f"distribution={self.distribution!r}, method={self.method!r}, seed={self.seed})"
        )

    def parameters(self) -> list[Tensor]:
        """The chosen layers' parameters (looked up on every call, so ``model.to()`` is safe)."""
        return [getattr(module, attr) for module, attr in self._param_slots]

    def _gen(self, device: torch.device) -> torch.Generator:
        if self._generator is not None and self._generator.device == device:
            return self._generator
        g = torch.Generator(device=device)
        pending, self._pending_state = self._pending_state, None
        if self._generator is None and pending is None and self._draws == 0:
            g.manual_seed(self.seed)
        elif (self._generator is None and pending is not None
              and self._pending_device == g.device.type):
            g.set_state(pending)
        else:
            # A generator's state only fits its own kind of device: after the parameters moved
            # (or a run resumed on another device) the stream goes on from a seed derived from
            # the draws so far, rather than repeating the probes from the start.
            g.manual_seed(_derived_seed(self.seed, self._draws))
        self._generator = g
        return g

    def sample_probes(self, n: int | None = None) -> list[list[Tensor]]:
        """Draw ``n`` (default ``n_probes``) probes, each a list shaped like the chosen params."""
        params = self.parameters()
        n = self.n_probes if n is None else n
        g = self._gen(params[0].device)
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        dtype, device = params[0].dtype, params[0].device
        probes = []
        self._draws += n
        for _ in range(n):
            # One draw for all parameters, then views: few kernel launches per probe.
            if self.distribution == "rademacher":
                flat = torch.randint(0, 2, (total,), generator=g, device=device, dtype=dtype)
                flat.mul_(2).sub_(1)
            else:
                flat = torch.randn(total, generator=g, device=device, dtype=dtype)
            probe = [chunk.view(p.shape).to(p.dtype) for chunk, p in zip(flat.split(sizes), params)]
            if self._masks is not None:
                probe = [v if m is None else v * m.to(v.device, v.dtype)
                         for v, m in zip(probe, self._masks)]
            probes.append(probe)
        return probes

    def state_dict(self) -> dict[str, Any]:
        """The probe generator's state and the recent Hessian penalty values (tensors, ints,
        floats: ``torch.load(weights_only=True)``)."""
        state, device = None, None
        if self._generator is not None:
            state, device = self._generator.get_state(), self._generator.device.type
        elif self._pending_state is not None:
            state, device = self._pending_state, self._pending_device
        return {"seed": self.seed, "generator": state, "device": device,
                "draws": self._draws, "recent": list(self._recent),
                "warned_negative": self._warned_negative}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator from :meth:`state_dict`: the next probes are as before (on the
        same kind of device; on another one they continue from a seed derived from the draws)."""
        self.seed = int(state["seed"])
        self._generator = None
        gen = state.get("generator")
        self._pending_state = None if gen is None else gen.clone()
        self._pending_device = state.get("device") or "cpu"
        self._draws = int(state.get("draws") or 0)
        self._recent = deque((float(r) for r in state.get("recent") or ()), maxlen=_RECENT)
        self._warned_negative = bool(state.get("warned_negative", False))

    # ------------------------------------------------------------------ the penalty
    def __call__(
        self,
        loss: Tensor,
        inputs: Any = None,
        targets: Any = None,
        probes: Sequence[Sequence[Tensor]] | None = None,
    ) -> Tensor:
        """The penalty for ``loss``: mean over probes of ``v^T H_SS v`` (differentiable), or of
        the Gauss-Newton forms, or the exact empirical-Fisher trace (``curvature``).

        ``inputs`` and ``targets`` (the batch ``loss`` was computed on) are needed by ``"fd"``,
        by ``"gauss_newton"`` and ``"fisher"``, and by ``"hvp"`` when the model normalises with
        batch statistics (see the module docstring); the trainer always passes them.

        ``probes`` (advanced) replaces the drawn probes: a list of probes, each a list of
        tensors shaped like :meth:`parameters` (for ``"gauss_newton"``: parameter-space forms
        ``(J_S v)^T H_z (J_S v)``; ``"fisher"`` takes none).
        """
        _check_loss(loss)
        if self.curvature == "fisher":
            if probes is not None:
                raise HesslensInputError(
                    "curvature='fisher' is exact and takes no probes; call pen(loss, inputs=x, "
                    "targets=y)")
            with named_derivative_errors(_NO_DOUBLE_BACKWARD):
                return self._fisher(loss, inputs, targets).reshape(())
        if probes is not None and len(probes) == 0:
            raise HesslensInputError("probes is empty; pass at least one probe or None")
        if self.curvature == "gauss_newton":
            with named_derivative_errors(_NO_DOUBLE_BACKWARD):
                return self._gauss_newton(inputs, targets, probes).reshape(())
        drawn = probes is None
        if probes is None:
            probes = self.sample_probes()
        if self.method == "hvp":
            with named_derivative_errors(_NO_DOUBLE_BACKWARD):
                out = self._hvp(self._loss_for_third_derivatives(loss, inputs, targets), probes)
        else:
            out = self._fd(loss, inputs, targets, probes, probes_drawn=drawn)
        self._watch_sign(out)
        return out.reshape(())

    @property
    def running_trace(self) -> float | None:
        """Mean of the last (up to 50) Hessian penalty values; ``None`` before the first."""
        return sum(self._recent) / len(self._recent) if self._recent else None

    def _watch_sign(self, value: Tensor) -> None:
        """Warn once when the last (10 to 50) Hessian penalties average below zero by more than
        three standard errors: a negative trace, not Hutchinson noise around a small one."""
        self._recent.append(float(value.detach().reshape(())))
        n = len(self._recent)
        if self._warned_negative or n < _RECENT_MIN:
            return
        mean = sum(self._recent) / n
        var = sum((r - mean) ** 2 for r in self._recent) / (n - 1)
        if mean + 3.0 * math.sqrt(var / n) < 0:
            self._warned_negative = True
            warnings.warn(
                f"the Hessian-trace penalty's running estimate is negative ({mean:.4g}, mean of "
                f"the last {n} calls): minimising it now rewards negative curvature (a more "
                "concave loss), not flatness; use curvature='gauss_newton' or 'fisher', whose "
                "traces are never negative",
                NegativeCurvatureWarning, stacklevel=3)

    def _batch_needed(self, inputs: Any, targets: Any) -> None:
        if inputs is None or targets is None:
            raise HesslensInputError(
                f"curvature={self.curvature!r} re-evaluates the model on the batch: call "
                "pen(loss, inputs=x, targets=y)")

    def _gauss_newton(self, inputs: Any, targets: Any,
                      probes: Sequence[Sequence[Tensor]] | None) -> Tensor:
        """The Gauss-Newton penalty on a re-evaluation of the batch: output-space forms
        ``||J_S^T S u||^2`` where ``H_z = S S^T`` has a closed form (cross-entropy, MSE), else
        (and for given parameter-space ``probes``) ``(J_S v)^T H_z (J_S v)``."""
        self._batch_needed(inputs, targets)
        params = self.parameters()
        buffers, devices = self._side_pass_state(params)
        with torch.random.fork_rng(devices=devices), DecomposedNorms(), second_order_kernels():
            outputs = torch.func.functional_call(self.model, buffers, (inputs,),
                                                 tie_weights=False)
            if not isinstance(outputs, Tensor):
                raise HesslensInputError(
                    "curvature='gauss_newton' needs the model's output as one tensor, got "
                    f"{type(outputs).__name__}; wrap the model so that it returns its logits")
            loss = self.loss_fn(outputs, targets)
        sqrt_h = output_sqrt_hessian(self.loss_fn, outputs, targets) if probes is None else None
        if sqrt_h is not None:
            return gauss_newton_output_forms(outputs, params, sqrt_h,
                                             self.sample_output_probes(outputs), self._masks)
        return gauss_newton_forms(outputs, loss, params,
                                  self.sample_probes() if probes is None else probes)

    def sample_output_probes(self, like: Tensor, n: int | None = None) -> list[Tensor]:
        """``n`` (default ``n_probes``) probes shaped like the model's outputs ``like``, from the
        same generator as :meth:`sample_probes` (Gauss-Newton's output-space forms)."""
        n = self.n_probes if n is None else n
        g = self._gen(like.device)
        self._draws += n
        if self.distribution == "rademacher":
            return [torch.randint(0, 2, like.shape, generator=g, device=like.device,
                                  dtype=like.dtype).mul_(2).sub_(1) for _ in range(n)]
        return [torch.randn(like.shape, generator=g, device=like.device, dtype=like.dtype)
                for _ in range(n)]

    def _fisher(self, loss: Tensor, inputs: Any, targets: Any) -> Tensor:
        """``(1/N) sum_i ||d l_i / d theta_S||^2`` from per-sample gradients of the batch."""
        self._batch_needed(inputs, targets)
        params = self.parameters()
        buffers, devices = self._side_pass_state(params)
        with torch.random.fork_rng(devices=devices), DecomposedNorms(), second_order_kernels():
            coupled = batch_statistics_modules(self.model)
            if coupled:
                self._warn_coupled(coupled, inputs)
                outputs = torch.func.functional_call(self.model, buffers, (inputs,),
                                                     tie_weights=False)
                trace, mean_loss = coupled_fisher_trace(outputs, targets, self.loss_fn, params,
                                                        self._masks)
            else:
                trace, mean_loss = empirical_fisher_trace(self.model, self._fd_slots, params,
                                                          inputs, targets, self.loss_fn,
                                                          self._masks)
        dropout = self.model.training and any(m.training and m.p > 0 for m in self._dropouts)
        batch_loss = float(loss.detach().reshape(()))
        per_sample = float(mean_loss)
        # loose enough for the rounding of half-precision losses, tight enough for a sum or
        # class weights
        tol = max(1e-3, 8 * torch.finfo(loss.dtype).eps) * max(1.0, abs(batch_loss))
        if not dropout and not abs(per_sample - batch_loss) <= tol:
            raise HesslensInputError(
                f"the loss ({batch_loss:.6g}) is not the mean of the per-sample losses "
                f"loss_fn(outputs[i:i+1], y[i:i+1]) ({per_sample:.6g}); curvature='fisher' "
                "needs a batch-mean loss (reduction='mean', no class weights, no ignored "
                "labels) and the loss of this batch")
        return trace

    def _loss_for_third_derivatives(self, loss: Tensor, inputs: Any, targets: Any) -> Tensor:
        """``loss``, or the same loss re-evaluated where fused normalisation kernels would make
        the penalty's gradient wrong (see :mod:`hesslens.training.norms`)."""
        fused = fused_norms_in_graph(loss)
        if not fused:
            return loss
        if self.loss_fn is None or inputs is None or targets is None:
            raise HesslensInputError(
                f"the loss is computed through {fused} (BatchNorm in training mode, InstanceNorm "
                "or LayerNorm), whose fused kernels give wrong third derivatives in PyTorch "
                "(pytorch/pytorch#186256, #175754), so the penalty's gradient would be silently "
                "wrong; give loss_fn= at construction and call pen(loss, inputs=x, targets=y) "
                "so that the penalty re-evaluates the loss with differentiable normalisation, "
                "or use method='fd'"
            )
        # Batch statistics as in the training pass, on copies of the running statistics; the
        # global random-number stream is left where the training pass left it.
        buffers, devices = self._side_pass_state(self.parameters())
        # re-evaluated on attention kernels that have double backward, too
        with torch.random.fork_rng(devices=devices), DecomposedNorms(), second_order_kernels():
            out = torch.func.functional_call(self.model, buffers, (inputs,), tie_weights=False)
            return self.loss_fn(out, targets)

    def _hvp(self, loss: Tensor, probes: Sequence[Sequence[Tensor]]) -> Tensor:
        params = self.parameters()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        pairs = [(g, i) for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not pairs:
            # The loss is at most linear in the chosen parameters: the block is zero.
            return loss * 0.0
        g_used = [g for g, _ in pairs]
        idx = [i for _, i in pairs]
        p_used = [params[i] for i in idx]
        total: Tensor | None = None
        for v in probes:
            v_used = [v[i] for i in idx]
            # H v as the vector-Jacobian product of the gradient with v (H is symmetric): no
            # dot-product nodes between the first and second backward pass.
            hv = torch.autograd.grad(g_used, p_used, grad_outputs=v_used, create_graph=True,
                                     allow_unused=True)
            q = sum(
                (h * vi).sum() for h, vi in zip(hv, v_used) if h is not None
            )
            if not isinstance(q, Tensor):
                q = loss * 0.0
            total = q if total is None else total + q
        assert total is not None
        return total / len(probes)

    def _fd(self, loss: Tensor, inputs: Any, targets: Any,
            probes: Sequence[Sequence[Tensor]], probes_drawn: bool = False) -> Tensor:
        if self.loss_fn is None:
            raise HesslensInputError(
                "method='fd' re-evaluates the loss at perturbed parameters and needs "
                "loss_fn(outputs, targets): pass loss_fn= to HessianTracePenalty"
            )
        if inputs is None or targets is None:
            raise HesslensInputError(
                "method='fd' needs the batch the loss was computed on: call "
                "pen(loss, inputs=x, targets=y)"
            )
        self._warn_dropout()
        self._warn_piecewise_linear()
        params = self.parameters()
        with torch.no_grad():
            theta_norm = float(torch.stack([p.detach().pow(2).sum() for p in params]).sum().sqrt())
        rel = self.fd_eps if self.fd_eps is not None else default_fd_eps(params[0].dtype)
        scale = theta_norm if theta_norm > 0 else 1.0
        n_entries = sum(p.numel() for p in params)
        buffers, devices = self._side_pass_state(params)
        self.last_fd_steps = []
        total: Tensor | None = None
        for v in probes:
            if self.distribution == "rademacher" and probes_drawn:
                v_norm = math.sqrt(n_entries)  # entries are +-1
            else:
                with torch.no_grad():
                    v_norm = float(torch.stack([vi.pow(2).sum() for vi in v]).sum().sqrt())
            if v_norm == 0:
                continue
            eps = rel * scale / v_norm
            self.last_fd_steps.append(eps)
            with torch.random.fork_rng(devices=devices):
                cpu_state = torch.get_rng_state()
                cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
                losses = []
                for sign in (1.0, -1.0):
                    torch.set_rng_state(cpu_state)
                    for d, s in zip(devices, cuda_states):
                        torch.cuda.set_rng_state(s, d)
                    shifted = [torch.add(p, vi, alpha=sign * eps) for p, vi in zip(params, v)]
                    moved = {n: shifted[i] for n, i in self._fd_slots}
                    moved.update(buffers)
                    out = torch.func.functional_call(self.model, moved, (inputs,),
                                                     tie_weights=False)
                    losses.append(self.loss_fn(out, targets))
            q = (losses[0] - 2.0 * loss + losses[1]) / (eps * eps)
            total = q if total is None else total + q
        if total is None:
            return loss * 0.0
        return total / len(probes)

    def _side_pass_state(self, params: Sequence[Tensor]) -> tuple[dict[str, Tensor], list]:
        """For a forward pass of our own beside the training pass: copies of the buffers a
        training-mode pass updates in place (normalisation statistics; none in eval mode), so
        the model's stay untouched, and the CUDA devices whose random state to fork."""
        buffers: dict[str, Tensor] = {}
        if self.model.training:
            for full_name, module, attr in self._stat_slots:
                b = getattr(module, attr, None)
                if isinstance(b, Tensor):
                    buffers[full_name] = b.clone()
        devices = sorted({p.device for p in params if p.device.type == "cuda"}, key=str)
        return buffers, devices

    def _warn_coupled(self, modules: list[str], inputs: Any) -> None:
        if self._warned_coupled:
            return
        self._warned_coupled = True
        n = inputs.shape[0] if isinstance(inputs, Tensor) else "N"
        warnings.warn(
            f"HessianTracePenalty(curvature='fisher') with {modules} normalising by batch "
            f"statistics: each of the {n} per-sample gradients reaches through the whole "
            "batch, which takes a reverse pass per sample (vmapped); this can be orders of "
            "magnitude slower than a training step. Consider curvature='gauss_newton', or "
            "those layers in eval mode",
            stacklevel=4,
        )

    def _warn_piecewise_linear(self) -> None:
        if self._warned_kinks:
            return
        self._warned_kinks = True
        kinds = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.PReLU,
                 nn.modules.pooling._MaxPoolNd)
        found = sorted({type(m).__name__ for m in self.model.modules() if isinstance(m, kinds)})
        if found:
            warnings.warn(
                f"HessianTracePenalty(method='fd') on a network with {found}: across their "
                "kinks the finite difference measures the curvature of the smoothed loss, not "
                "tr(H), and its gradient is heavy-tailed (training can diverge); prefer "
                "method='hvp' or a smaller gamma",
                stacklevel=3,
            )

    def _warn_dropout(self) -> None:
        if self._warned_dropout or not self.model.training:
            return
        for m in self._dropouts:
            if m.training and m.p > 0:
                warnings.warn(
                    "HessianTracePenalty(method='fd') with active dropout: the finite "
                    "difference compares losses computed with different dropout masks and is "
                    "not a curvature estimate; use method='hvp' or disable dropout",
                    stacklevel=3,
                )
                self._warned_dropout = True
                return
