"""The edge of stability of an optimizer, read from the optimizer object itself.

On the quadratic model of the loss, ``L(θ) = ½ θᵀ H θ``, an optimizer is stable along an
eigenvector of ``H`` with eigenvalue ``a`` only while ``a`` stays below a threshold set by its
learning rate and momentum (Cohen et al., "Gradient Descent on Neural Networks Typically Occurs
at the Edge of Stability", ICLR 2021, and "Adaptive Gradient Methods at the Edge of Stability",
2022). With ``η`` the learning rate, ``β`` the momentum, ``τ`` its dampening (PyTorch's
conventions):

* gradient descent, ``θ ← θ - η g``: ``2 / η``;
* heavy-ball momentum, ``b ← β b + (1 - τ) g``, ``θ ← θ - η b``: ``(2 + 2β) / ((1 - τ) η)``
  (``τ = 0``: ``(2 + 2β) / η``); the recursion ``z² - (1 + β - η(1 - τ)a) z + β`` has a root
  at ``z = -1`` exactly there;
* Nesterov, ``b ← β b + g``, ``θ ← θ - η (g + β b)``: ``(2 + 2β) / ((1 + 2β) η)`` (Cohen et al.
  2021, appendix; the recursion ``z² - (1 + β - η(1 + β)a) z + β - ηβa`` at ``z = -1``);
* Adam and AdamW, ``θ ← θ - η P⁻¹ m`` with ``m ← β1 m + (1 - β1) g`` and the preconditioner
  ``P = (1 - β1^t) (sqrt(v / (1 - β2^t)) + ε)`` (the first moment's bias correction folded
  into ``P``, as Cohen et al. 2022 write it): the *preconditioned* sharpness
  ``λ1(P⁻¹ H) = λ1(P^(-1/2) H P^(-1/2))`` against ``(2 + 2β1) / ((1 - β1) η)``, ``38 / η``
  for ``β1 = 0.9`` (the heavy-ball rule with ``τ = β1``).

Weight decay. Coupled decay (SGD's and Adam's ``weight_decay``) adds ``λθ`` to the gradient, so
the optimizer descends ``L + ½ λ |θ|²`` whose Hessian is ``H + λ I``: the threshold on
``λ1(H)`` is lowered by ``λ`` (for Adam, ``λ I`` is added inside the preconditioned matrix).
AdamW's decoupled decay, ``θ ← (1 - ηλ) θ - η P⁻¹ m``, leaves ``H`` alone; on the quadratic
model it turns the recursion's constant ``β1`` into ``β1 (1 - ηλ)`` and moves the threshold to
``(1 + β1)(2 - ηλ) / ((1 - β1) η)``, a relative change of ``ηλ / 2`` (5e-6 at ``η = 1e-3``,
``λ = 1e-2``): below what the sharpness is measured to, so the threshold is ``38 / η`` as Cohen
et al. use it for AdamW.

Parameter groups. Groups may differ in learning rate (and weight decay); they must agree on
the momentum (SGD: ``momentum``, ``dampening``, ``nesterov``; Adam: ``β1``), which sets the
threshold. Different learning rates enter as a diagonal preconditioner: with ``η`` the largest
group's rate, a parameter of a group at ``η_g`` moves as if preconditioned by ``η / η_g``, and
its coupled decay as a diagonal shift; the quantity compared is then the preconditioned
sharpness (for SGD too). A trainable parameter the optimizer does not hold never moves
(``P = ∞`` there).

Example:
    >>> import torch
    >>> net = torch.nn.Linear(3, 1)
    >>> rule = stability_rule(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
    ...                       list(net.parameters()))
    >>> rule.threshold, rule.compared
    (38.0, 'sharpness')
    >>> adam = torch.optim.Adam(net.parameters(), lr=1e-3)
    >>> round(stability_rule(adam, list(net.parameters())).threshold, 6)
    38000.0
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hesslens.errors import HesslensInputError

__all__ = [
    "SUPPORTED",
    "StabilityRule",
    "adam_threshold",
    "preconditioner",
    "sgd_threshold",
    "stability_rule",
    "unwrap_optimizer",
]

#: The optimizers whose threshold is known (their subclasses included).
SUPPORTED = ("torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW")


def sgd_threshold(lr: float, momentum: float = 0.0, dampening: float = 0.0,
                  nesterov: bool = False) -> float:
    """The largest stable eigenvalue of ``H`` for SGD at ``lr`` (see the module docstring).

    >>> sgd_threshold(0.1), sgd_threshold(0.1, momentum=0.9), sgd_threshold(0.1, 0.5, 0, True)
    (20.0, 38.0, 15.0)
    """
    if lr <= 0:
        return math.inf
    if nesterov:
        return 2.0 / lr * (1.0 + momentum) / (1.0 + 2.0 * momentum)
    return 2.0 / lr * (1.0 + momentum) / (1.0 - dampening)


def adam_threshold(lr: float, beta1: float) -> float:
    """The largest stable eigenvalue of ``P⁻¹ H`` for Adam(W) at ``lr``:
    ``(2 + 2 β1) / ((1 - β1) lr)``.

    >>> round(adam_threshold(1e-3, 0.9), 6)
    38000.0
    """
    return sgd_threshold(lr, momentum=beta1, dampening=beta1)


@dataclass(frozen=True)
class StabilityRule:
    """What an optimizer's edge of stability is, from its hyperparameters.

    Attributes:
        optimizer: the optimizer's class name.
        family: ``"sgd"``, ``"adam"``, or ``None`` (unknown: no threshold).
        lr: the reference learning rate ``η`` (the largest group's), or ``None``.
        threshold: the stability threshold of the quantity compared, or ``None``.
        compared: ``"sharpness"`` (``λ1(H)``) or ``"preconditioned_sharpness"``
            (``λ1(P^(-1/2) (H + S) P^(-1/2))``, see :func:`preconditioner`).
        formula: the rule, in words.
        beta1: the momentum ``β`` (SGD) or ``β1`` (Adam).
    """

    optimizer: str
    family: str | None
    lr: float | None
    threshold: float | None
    compared: str
    formula: str
    beta1: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "family": self.family, "lr": self.lr,
                "threshold": self.threshold, "compared": self.compared,
                "formula": self.formula}


def unwrap_optimizer(optimizer: Any) -> Any:
    """The ``torch.optim.Optimizer`` inside a framework's wrapper (accelerate's
    ``AcceleratedOptimizer``: ``.optimizer``; Lightning's ``LightningOptimizer``:
    ``._optimizer``)."""
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
            optimizer = inner
            continue
        break
    return optimizer


def _value(x: Any) -> float:
    return float(x.item() if isinstance(x, torch.Tensor) else x)


def _groups_of(optimizer: torch.optim.Optimizer,
               params: Sequence[torch.Tensor]) -> list[Mapping[str, Any] | None]:
    """The parameter group of each of ``params`` (``None``: not in the optimizer)."""
    where = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return [where.get(id(p)) for p in params]


def _same(groups: Sequence[Mapping[str, Any]], keys: Sequence[str], name: str) -> None:
    for key in keys:
        values = {repr(g.get(key)) for g in groups}
        if len(values) > 1:
            raise HesslensInputError(
                f"the {name} parameter groups differ in {key!r} ({', '.join(sorted(values))}): "
                f"its edge of stability is defined for one {key!r}; give every group the same "
                f"{key!r}, or pass optimizer=None to record the sharpness without a threshold")


def stability_rule(optimizer: Any, params: Sequence[torch.Tensor],
                   warn: bool = True) -> StabilityRule:
    """The :class:`StabilityRule` of ``optimizer`` for the parameters ``params`` (the
    curvature operator's, in its order).

    Raises:
        HesslensInputError: parameter groups that differ in momentum (or ``β1``), which the
            threshold depends on.

    Warns:
        UserWarning: an optimizer whose threshold is not known (once; the rule then has
            ``threshold=None``), naming the supported ones.
    """
    optimizer = unwrap_optimizer(optimizer)
    name = type(optimizer).__name__
    groups = [g for g in _groups_of(optimizer, params) if g is not None] if isinstance(
        optimizer, torch.optim.Optimizer) else []
    if not groups:
        if warn:
            warnings.warn(
                f"the optimizer {name} holds none of the model's trainable parameters: the "
                "sharpness is recorded without a threshold", stacklevel=3)
        return StabilityRule(name, None, None, None, "sharpness", "none")
    lrs = [_value(g["lr"]) for g in groups]
    lr = max(lrs)
    covered = len(groups) == len(params)
    uniform = covered and len(set(lrs)) == 1 and len(
        {_value(g.get("weight_decay", 0.0)) for g in groups}) == 1
    if any(g.get("maximize", False) for g in groups):
        family = None
    elif isinstance(optimizer, torch.optim.SGD):
        family = "sgd"
    elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        family = "adam"
    else:
        family = None
    if family is None:
        if warn:
            warnings.warn(
                f"no stability threshold is known for {name}"
                f"{' with maximize=True' if any(g.get('maximize') for g in groups) else ''}: "
                f"the sharpness is recorded with threshold None (supported: "
                f"{', '.join(SUPPORTED)})", stacklevel=3)
        return StabilityRule(name, None, lr, None, "sharpness", "unknown")
    if family == "sgd":
        _same(groups, ("momentum", "dampening", "nesterov"), name)
        g = groups[0]
        beta, damp = _value(g.get("momentum", 0.0)), _value(g.get("dampening", 0.0))
        nesterov = bool(g.get("nesterov", False))
        if nesterov:
            formula = "(2 + 2 momentum) / ((1 + 2 momentum) lr)"
        elif beta:
            formula = ("(2 + 2 momentum) / lr" if not damp
                       else "(2 + 2 momentum) / ((1 - dampening) lr)")
        else:
            formula = "2 / lr"
        threshold = sgd_threshold(lr, beta, damp, nesterov)
        if uniform:
            wd = _value(g.get("weight_decay", 0.0))
            if wd:
                threshold -= wd
                formula += " - weight_decay"
            return StabilityRule(name, "sgd", lr, threshold, "sharpness", formula, beta)
        return StabilityRule(name, "sgd", lr, threshold, "preconditioned_sharpness",
                             formula + " (groups' lr as a preconditioner)", beta)
    _same(groups, ("betas",), name)
    beta1 = _value(groups[0]["betas"][0])
    return StabilityRule(name, "adam", lr, adam_threshold(lr, beta1),
                         "preconditioned_sharpness", "(2 + 2 beta1) / ((1 - beta1) lr)", beta1)


def preconditioner(
    optimizer: Any, named_params: Sequence[tuple[str, torch.Tensor]], rule: StabilityRule,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None] | None:
    """The diagonal ``P`` and the shift ``S`` of the preconditioned sharpness
    ``λ1(P^(-1/2) (H + S) P^(-1/2))`` that ``rule.threshold`` bounds, per parameter name, or
    ``None`` where it is not defined yet (Adam before its first step) or not needed.

    Adam(W): ``P = (1 - β1^t) (sqrt(v / (1 - β2^t)) + ε) η / η_g`` from the optimizer's state
    (``max_exp_avg_sq`` with ``amsgrad``); SGD with groups: ``P = η / η_g``. ``S``: the coupled
    weight decay of each group (``None`` when there is none). A parameter the optimizer does
    not hold, or has no state for yet, gets ``P = ∞`` (it does not move).
    """
    if rule.compared != "preconditioned_sharpness" or rule.lr is None:
        return None
    optimizer = unwrap_optimizer(optimizer)
    params = [p for _, p in named_params]
    groups = _groups_of(optimizer, params)
    diag: dict[str, torch.Tensor] = {}
    shift: dict[str, torch.Tensor] = {}
    any_state = False
    for (name, p), g in zip(named_params, groups):
        inf = torch.full_like(p, math.inf, dtype=torch.float64)
        if g is None or _value(g["lr"]) <= 0:
            diag[name] = inf
            continue
        ratio = rule.lr / _value(g["lr"])
        wd = _value(g.get("weight_decay", 0.0))
        decoupled = rule.family == "adam" and (
            isinstance(optimizer, torch.optim.AdamW)
            or bool(g.get("decoupled_weight_decay", False)))
        shift[name] = torch.full_like(p, 0.0 if decoupled else wd, dtype=torch.float64)
        if rule.family == "sgd":
            diag[name] = torch.full_like(p, ratio, dtype=torch.float64)
            any_state = True
            continue
        state = optimizer.state.get(p, {})
        v = state.get("max_exp_avg_sq" if g.get("amsgrad", False) else "exp_avg_sq")
        if v is None or "step" not in state:
            diag[name] = inf
            continue
        t = _value(state["step"])
        beta1, beta2 = (_value(b) for b in g["betas"])
        eps = _value(g["eps"])
        v64 = v.detach().to(torch.float64)
        diag[name] = (1 - beta1**t) * ((v64 / (1 - beta2**t)).sqrt() + eps) * ratio
        any_state = True
    if not any_state:
        return None
    has_shift = any(bool(s.any()) for s in shift.values())
    return diag, (shift if has_shift else None)
