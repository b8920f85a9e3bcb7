r"""Hessian trace regularization (HTR): a differentiable curvature-trace estimate as a loss term.

Sankar et al. (AAAI 2021) add ``gamma * tr(H)`` to the training loss, the trace estimated by
Hutchinson's method: for probes ``v`` with ``E[v v^T] = I``, ``E[v^T H v] = tr(H)``.
:class:`HessianTracePenalty` returns

.. math::
    P(\theta) = \frac{1}{m} \sum_{i=1}^{m} v_i^\top H_{SS}(\theta)\, v_i,
    \qquad \mathbb{E}[P] = \sum_{l \in S} \operatorname{tr}(H_{ll}),

``S`` the chosen layers and ``H_SS`` the Hessian in their parameters only. ``P`` is an ordinary
differentiable scalar: add ``gamma * P`` to the loss and call ``backward()``; its gradient
reaches every parameter, so it works with any optimizer, schedule, gradient accumulation or
mixed-precision scaler. Differentiating with respect to the chosen parameters only lets the
backward passes stop at the first chosen layer, so ``layers="middle"`` is cheaper than
``layers="all"`` (the authors' code zeroed the probe outside the middle layers and saved
nothing).

The curvature (``curvature=``) and how it is computed are one small class each
(:mod:`hesslens.training.penalty_forms`):

* ``"hessian"`` (the paper): ``method="hvp"`` by double backward, or ``method="fd"`` by the
  second difference of losses ``(L(θ + hv) - 2 L(θ) + L(θ - hv)) / h^2`` (first order only;
  ``||h v|| = fd_eps * ||θ_S||``, default ``(48 u)^(1/4)``; on ReLU networks it measures the
  curvature of the loss smoothed over the step, and says so once). The Hessian is indefinite:
  when the mean of the last 50 values is below zero by three standard errors the penalty
  rewards concavity, and :class:`NegativeCurvatureWarning` says so once.
* ``"gauss_newton"``: ``E[P] = tr(J_S^T H_z J_S)``, never negative for a loss convex in the
  outputs; output-space probes ``||J_S^T S u||^2`` where ``H_z = S S^T`` has a closed form
  (softmax cross-entropy, MSE), parameter-space forms otherwise.
* ``"fisher"``: ``(1/N) sum_i ||d l_i / dθ_S||^2``, the empirical Fisher's trace (true labels)
  exact from per-sample gradients: no probes. A batch loss other than ``mean_i l_i`` is refused
  by name.

The last two, ``"fd"``, and ``"hvp"`` through PyTorch's fused BatchNorm, InstanceNorm or
LayerNorm kernels (whose third derivatives are wrong: :mod:`hesslens.training.norms`)
re-evaluate the model on the batch: give ``loss_fn`` at construction and call
``pen(loss, inputs=x, targets=y)``; running statistics and the random-number stream stay
untouched. Errors, steps and costs of each form, measured: ``benchmarks/README.md`` ("The
training penalty"). Probes come from a generator seeded with ``seed`` whose state is part of
:meth:`HessianTracePenalty.state_dict`, so a resumed run draws the same probes.

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

from hesslens.checks import SEED_LIMIT, check_positive_int, check_seed
from hesslens.curvature.blocks import block_parameters
from hesslens.curvature.checkpointing import checkpoint_errors
from hesslens.curvature.products import (
    named_derivative_errors,
    second_difference_step,
    second_order_kernels,
)
from hesslens.errors import HesslensInputError
from hesslens.linalg.probes import check_distribution, random_probes
from hesslens.training.layers_select import select_blocks
from hesslens.training.norms import DecomposedNorms, fused_norms_in_graph
from hesslens.training.penalty_forms import (
    FisherForm,
    GaussNewtonForm,
    HessianForm,
    SecondDifferenceForm,
    SidePass,
    owning_slot,
    parameter_slots,
    slice_masks,
)

__all__ = ["HessianTracePenalty", "NegativeCurvatureWarning", "default_fd_eps"]

_NO_DOUBLE_BACKWARD = (
    "the penalty differentiates the training loss twice; compute that loss under "
    "torch.nn.attention.sdpa_kernel(SDPBackend.MATH) (PyTorch's fused attention kernels have "
    "no double backward), or use method='fd'")
_METHODS = ("hvp", "fd")
_CURVATURES = ("hessian", "gauss_newton", "fisher")

#: How many recent Hessian penalty values the negative-curvature check averages, and how many it
#: needs before it judges.
_RECENT, _RECENT_MIN = 50, 10

#: The default relative step of ``method="fd"``: ``(48 u)^(1/4)`` for the parameters' dtype.
default_fd_eps = second_difference_step


class NegativeCurvatureWarning(UserWarning):
    """The running mean of a Hessian-trace penalty is significantly below zero: the penalty then
    rewards negative curvature (it lowers the loss by making it more concave)."""


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
            :mod:`hesslens.training.penalty_forms`.

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
        _check_arguments(model, n_probes, distribution, method, curvature, fd_eps, loss_fn)
        if seed is not None:
            seed = check_seed(seed)
        self.model = model
        self.blocks = select_blocks(model, layers, grouping)
        self.layer_params: dict[str, list[str]] = block_parameters(self.blocks)
        self.layers: list[str] = list(self.blocks)
        self.param_names: list[str] = list(dict.fromkeys(
            n for ns in self.layer_params.values() for n in ns))
        # Blocks that are slices of a parameter (q of a fused QKV weight): the probe is zero
        # outside the slice, so v^T H v estimates the trace of the slice's block alone.
        self._masks = slice_masks(model, self.blocks, self.param_names)
        # (module, attribute) of each chosen parameter: a lookup per call that stays right after
        # model.to(), without walking named_parameters() on every training step.
        self._param_slots = [owning_slot(model, n) for n in self.param_names]
        # every place that holds a chosen parameter: a shared one is moved in both
        self._side_pass = SidePass(model, parameter_slots(model, self.param_names))
        self._dropouts = [m for m in model.modules()
                          if isinstance(m, nn.modules.dropout._DropoutNd)]
        self.curvature = curvature
        self.n_probes = n_probes
        self.distribution = distribution
        self.method = method
        self.fd_eps = fd_eps
        self.loss_fn = loss_fn
        self._hessian_form = HessianForm()
        self._fd_form = SecondDifferenceForm(self._side_pass, loss_fn) if loss_fn else None
        self._gn_form = GaussNewtonForm(self._side_pass, loss_fn) if loss_fn else None
        self._fisher_form = FisherForm(self._side_pass, loss_fn) if loss_fn else None
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

    @property
    def last_fd_steps(self) -> list[float]:
        """The finite-difference steps of the last ``method="fd"`` call."""
        return self._fd_form.last_steps if self._fd_form is not None else []

    def __repr__(self) -> str:
        return (
            f"HessianTracePenalty(layers={self.layers}, curvature={self.curvature!r}, "
            f"n_probes={self.n_probes}, "
            f"distribution={self.distribution!r}, method={self.method!r}, seed={self.seed})"
        )

    def parameters(self) -> list[Tensor]:
        """The chosen layers' parameters (looked up on every call, so ``model.to()`` is safe)."""
        return [getattr(module, attr) for module, attr in self._param_slots]

    # ------------------------------------------------------------------ probes
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
        """Draw ``n`` (default ``n_probes``) probes, each a list shaped like the chosen params
        (zero outside the chosen slices)."""
        params = self.parameters()
        n = self.n_probes if n is None else n
        g = self._gen(params[0].device)
        sizes = [p.numel() for p in params]
        self._draws += n
        probes = []
        for _ in range(n):
            # one draw for all parameters, then views: few kernel launches per probe
            flat = random_probes(1, sum(sizes), self.distribution, generator=g,
                                 dtype=params[0].dtype, device=params[0].device)[0]
            probe = [chunk.view(p.shape).to(p.dtype) for chunk, p in zip(flat.split(sizes), params)]
            if self._masks is not None:
                probe = [v if m is None else v * m.to(v.device, v.dtype)
                         for v, m in zip(probe, self._masks)]
            probes.append(probe)
        return probes

    def sample_output_probes(self, like: Tensor, n: int | None = None) -> list[Tensor]:
        """``n`` (default ``n_probes``) probes shaped like the model's outputs ``like``, from the
        same generator as :meth:`sample_probes` (Gauss-Newton's output-space forms)."""
        n = self.n_probes if n is None else n
        g = self._gen(like.device)
        self._draws += n
        return [random_probes(1, like.numel(), self.distribution, generator=g, dtype=like.dtype,
                              device=like.device)[0].view(like.shape) for _ in range(n)]

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
        if probes is not None and len(probes) == 0:
            raise HesslensInputError("probes is empty; pass at least one probe or None")
        if self.curvature == "fisher":
            if probes is not None:
                raise HesslensInputError(
                    "curvature='fisher' is exact and takes no probes; call pen(loss, inputs=x, "
                    "targets=y)")
            self._batch_needed(inputs, targets)
            with named_derivative_errors(_NO_DOUBLE_BACKWARD):
                return self._fisher_form(loss, self.parameters(), inputs, targets, self._masks,
                                         self._dropout_active(),
                                         lambda modules: self._warn_coupled(modules, inputs)
                                         ).reshape(())
        if self.curvature == "gauss_newton":
            self._batch_needed(inputs, targets)
            with named_derivative_errors(_NO_DOUBLE_BACKWARD):
                return self._gn_form(self.parameters(), inputs, targets,
                                     self.sample_output_probes, self.sample_probes, probes,
                                     self._masks).reshape(())
        drawn = probes is None
        if probes is None:
            probes = self.sample_probes()
        if self.method == "hvp":
            with named_derivative_errors(_NO_DOUBLE_BACKWARD), checkpoint_errors():
                out = self._hessian_form(self._loss_for_third_derivatives(loss, inputs, targets),
                                         self.parameters(), probes)
        else:
            out = self._second_difference(loss, inputs, targets, probes, drawn)
        self._watch_sign(out)
        return out.reshape(())

    def _second_difference(self, loss: Tensor, inputs: Any, targets: Any,
                           probes: Sequence[Sequence[Tensor]], drawn: bool) -> Tensor:
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
        relative = self.fd_eps if self.fd_eps is not None else default_fd_eps(params[0].dtype)
        # drawn Rademacher probes have entries +-1: their norm is known
        unit = (math.sqrt(sum(p.numel() for p in params))
                if self.distribution == "rademacher" and drawn else None)
        return self._fd_form(loss, params, probes, inputs, targets, relative, unit)

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
        # batch statistics as in the training pass, on copies of the running statistics;
        # attention on kernels that have double backward
        params = self.parameters()
        out = self._side_pass.outputs(params, inputs)
        with torch.random.fork_rng(devices=SidePass.devices(params)), DecomposedNorms(), \
                second_order_kernels():
            return self.loss_fn(out, targets)

    def _dropout_active(self) -> bool:
        return self.model.training and any(m.training and m.p > 0 for m in self._dropouts)

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


def _check_arguments(model: Any, n_probes: Any, distribution: str, method: str, curvature: str,
                     fd_eps: float | None, loss_fn: Any) -> None:
    """Refuse, by name, arguments the penalty cannot work with."""
    if not isinstance(model, nn.Module):
        raise HesslensInputError(
            f"model must be a torch.nn.Module, got {type(model).__name__}"
        )
    check_positive_int(n_probes, "n_probes")
    check_distribution(distribution)
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
    if loss_fn is not None and not callable(loss_fn):
        raise HesslensInputError("loss_fn must be callable: loss_fn(outputs, targets)")
