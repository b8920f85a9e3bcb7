"""Layer discovery: which parameters make up each layer, in forward order.

A *layer* is the set of trainable parameters that one module owns directly (its weight and bias),
as in the paper, where a layer is one Conv2d or Linear. Modules that own no trainable parameter
(ReLU, pooling, containers) are not layers. A parameter shared between modules (tied weights)
belongs to the first module that owns it.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> discover_layers(model)
    {'0': ['0.weight', '0.bias'], '2': ['2.weight', '2.bias']}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from hesslens.errors import HesslensInputError

ROOT_LAYER = "<root>"


def discover_layers(model: nn.Module, example_inputs: object = None) -> dict[str, list[str]]:
    """Map each layer's name to the names of its trainable parameters.

    Layers come in forward order when ``example_inputs`` is given (the order in which the
    modules are first called in one forward pass, run without gradients and without touching
    BatchNorm statistics); otherwise, and for modules the forward pass does not call, in
    registration order. Parameter names are those of ``model.named_parameters()``.
    """
    owned = owned_parameters(model, lambda _name, param: param.requires_grad)
    return forward_sorted(model, owned, example_inputs)


def owned_parameters(
    model: nn.Module, keep: Callable[[str, nn.Parameter], bool]
) -> dict[str, list[str]]:
    """Map each module (``ROOT_LAYER`` for the model itself) to the names of the parameters it
    owns directly and ``keep(name, parameter)`` accepts, in registration order. A parameter
    shared between modules belongs to the first module that owns it; names are those of
    ``model.named_parameters()``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        >>> owned_parameters(model, lambda name, param: name.endswith("weight"))
        {'0': ['0.weight'], '1': ['1.weight']}
    """
    owned: dict[str, list[str]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        names = []
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            if keep(name, param):
                names.append(name)
        if names:
            owned[module_name or ROOT_LAYER] = names
    return owned


def forward_sorted(
    model: nn.Module, owned: dict[str, list[str]], example_inputs: object = None
) -> dict[str, list[str]]:
    """``owned`` (keyed by module name) reordered by when the modules are first called in one
    forward pass on ``example_inputs``; modules the pass does not call, and every module when
    ``example_inputs`` is None, keep their order at the end."""
    if example_inputs is None or len(owned) < 2:
        return owned
    order = _call_order(model, example_inputs, set(owned))
    ranked = sorted(owned, key=lambda name: order.get(name, len(order)))
    return {name: owned[name] for name in ranked}


def module_call_ranks(model: nn.Module, example_inputs: object) -> dict[str, int]:
    """Every module's rank in the order of first calls in one forward pass on
    ``example_inputs`` (``ROOT_LAYER`` for the model itself, rank -1): larger is later; modules
    the pass does not call are absent. A tuple or list is passed as positional arguments, a
    mapping as keyword arguments (``model(**batch)``), anything else as the one argument. The
    pass runs in eval mode (restored afterwards), without gradients.

    Example:
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> module_call_ranks(model, torch.zeros(1, 3))
        {'<root>': -1, '0': 1, '1': 2, '2': 3}
    """
    wanted = {name or ROOT_LAYER for name, _ in model.named_modules()}
    return _call_order(model, example_inputs, wanted)


def _call_order(model: nn.Module, example_inputs: object, wanted: set[str]) -> dict[str, int]:
    """Run one forward pass of ``model`` in eval mode and without gradients, and record when
    each wanted module runs. The modules' train/eval flags are restored afterwards; in eval mode
    BatchNorm leaves its statistics alone and dropout is off. No copy of the model is made (a
    deep copy of a 124M-parameter GPT-2 took 4 s and doubled its memory)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()

    def run() -> None:
        with torch.no_grad():
            if isinstance(example_inputs, (tuple, list)):
                model(*example_inputs)
            elif isinstance(example_inputs, Mapping):  # a Hugging Face style batch
                model(**example_inputs)
            else:
                model(example_inputs)

    try:
        order = record_call_order(model, run, wanted)
    finally:
        for module, training in modes:
            module.training = training
    if ROOT_LAYER in wanted:
        order[ROOT_LAYER] = -1
    return order


def record_call_order(model: nn.Module, run: Callable[[], object], wanted: set[str]
                      ) -> dict[str, int]:
    """Run ``run()`` (a forward pass of ``model``) and record the rank at which each wanted
    module (by name, ``ROOT_LAYER`` for the model itself) is first called.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> record_call_order(net, lambda: net(torch.zeros(1, 2)), {"1", "0"})
        {'0': 0, '1': 1}
    """
    order: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        key = name or ROOT_LAYER
        if key in wanted:

            def record(_module, _inputs, key=key):
                order.setdefault(key, len(order))

            handles.append(module.register_forward_pre_hook(record))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return order


def middle_indices(n: int) -> range:
    """Indices of the middle layers among ``n`` in forward order: ``round(n/4) .. round(3n/4)``
    (half-up, end excluded), and at least one layer.

    The paper's code took the parameter *tensors* with index ``floor(m/4) .. floor(3m/4)`` in
    ``named_parameters`` order (weights and biases counted apart, ``m ~ 2n``); rounding the layer
    indices gives the same layers on LeNet-5 (layers 1-3 of 5) while a 3-layer network gets its
    middle layer alone rather than all three (``floor``/``ceil`` would select every layer of a
    3-layer MLP, making "middle" the same as "all").

    Example:
        >>> [list(middle_indices(n)) for n in (1, 3, 4, 5)]
        [[0], [1], [1, 2], [1, 2, 3]]
    """
    if n <= 0:
        return range(0)
    lo = math.floor(n / 4 + 0.5)
    hi = math.floor(3 * n / 4 + 0.5)
    lo = min(lo, n - 1)
    return range(lo, max(hi, lo + 1))


def select_layers(layers: Mapping[str, object], names: str | Sequence[str], *,
                  what: str = "layer", valid: str | None = None) -> list[str]:
    """The one layer-selection rule: ``"all"``, ``"middle"``, one name, a list of names or a
    comma-separated string of them (as the command line passes it), resolved among ``layers``
    (any mapping keyed by name in forward order; its values are not looked at) and returned in
    forward order without duplicates. ``"middle"`` is :func:`middle_indices` of the ``n`` layers.
    ``what`` and ``valid`` word the errors (``valid``: what the names are).

    Example:
        >>> found = {"a": ["a.w"], "b": ["b.w"], "c": ["c.w"], "d": ["d.w"]}
        >>> select_layers(found, "middle"), select_layers(found, "d, a")
        (['b', 'c'], ['a', 'd'])
    """
    all_names = list(layers)
    valid = valid or f"the {what}s of this model are {all_names}"
    if isinstance(names, str):
        key = names.strip()
        if key == "all":
            return all_names
        if key == "middle":
            return [all_names[i] for i in middle_indices(len(all_names))]
        names = [key] if key in layers else [s.strip() for s in key.split(",") if s.strip()]
    chosen = list(names)
    if not chosen:
        raise HesslensInputError(
            f"no {what}s selected; pass 'all', 'middle' or some of the names: {valid}")
    unknown = [name for name in chosen if name not in layers]
    if unknown:
        raise HesslensInputError(
            f"unknown {what} name(s) {unknown}; {valid}, or use 'all' or 'middle'")
    wanted = set(chosen)
    return [name for name in all_names if name in wanted]
