"""What every ``hesslens`` command checks before any work: :func:`check_ready`.

A command that trains for minutes and then finds a module missing, or an output folder it
cannot write, has wasted those minutes. Each command therefore has one ``preflight_<command>``
function (in its own module) that runs first and builds on :func:`check_ready`: the modules the
command will import later (each named with the ``pip install`` that brings it), the device and
the output folder (not empty, not a file, creatable and writable), then the command's own flags
and its model/data pair. Anything wrong is a :class:`~hesslens.errors.HesslensInputError`,
which the command line prints as one line on stderr with exit code 2.

Example:
    >>> import tempfile
    >>> ready = check_ready(out=tempfile.mkdtemp(), device="cpu",
    ...                     needs={"matplotlib": "the figures"})
    >>> ready.device
    device(type='cpu')
    >>> try:
    ...     require({"no_such_module": "the demo"})
    ... except HesslensInputError as err:
    ...     print(err)
    the demo needs no_such_module, which is not installed: pip install no_such_module
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from hesslens.errors import HesslensInputError
from hesslens.experiments.common import check_out_dir, resolve_device
from hesslens.zoo.inputs import model_input

__all__ = ["INSTALL", "Ready", "check_ready", "model_needs", "refuse_hf_model", "require",
           "writable_out_dir"]

#: The ``pip install`` that brings each module a command may import (by import name); a module
#: not listed is installed under its own name.
INSTALL = {
    "transformers": 'pip install "hesslens[hf]" (or pip install transformers)',
    "lightning": 'pip install "hesslens[lightning]"',
    "accelerate": "pip install accelerate",
    "matplotlib": "pip install matplotlib",
    "sklearn": "pip install scikit-learn",
    "scipy": "pip install scipy",
    "tqdm": "pip install tqdm",
}


def model_needs(model: str) -> dict[str, str]:
    """The modules the zoo model ``model`` is built with, beyond torch: ``transformers`` for
    the Hugging Face models (``gpt-nano``, ``vit-tiny``), nothing for the others.

    >>> model_needs("gpt-nano"), model_needs("lenet")
    ({'transformers': 'the zoo model gpt-nano'}, {})
    """
    return {"transformers": f"the zoo model {model}"} if model_input(model) is not None else {}


def refuse_hf_model(model: str, command: str) -> None:
    """Refuse a Hugging Face model of the zoo in a command that trains classifiers on
    ``(inputs, labels)`` pairs with cross-entropy on ``model(x)`` (``train``, ``reproduce``):
    such a model takes its own batches and returns its own outputs and loss.

    >>> refuse_hf_model("lenet", "train")
    """
    if model_input(model) is not None:
        raise HesslensInputError(
            f"{command} trains classifiers on (inputs, labels) pairs; {model} is a Hugging "
            "Face model (its own batches and loss): study it with hesslens analyze, or train "
            "it with transformers.Trainer and hesslens.integrations.hf.CurvatureCallback")


def require(needs: Mapping[str, str]) -> None:
    """Import every module of ``needs`` (``{import name: what needs it}``); the first that is
    missing or fails to import is a :class:`HesslensInputError` naming its ``pip install``.

    The modules are imported, not only looked up, so that a broken installation fails here too
    (an import of a top-level package is cheap: ``transformers`` loads its models lazily).
    """
    for module, what in needs.items():
        install = INSTALL.get(module, f"pip install {module}")
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name not in (None, module) and not module.startswith(f"{err.name}."):
                raise HesslensInputError(  # the module is there; something it imports is not
                    f"{what} needs {module}, which fails to import ({err}): reinstall it: "
                    f"{install}") from None
            raise HesslensInputError(
                f"{what} needs {module}, which is not installed: {install}") from None
        except ImportError as err:  # e.g. a compiled part that does not load
            raise HesslensInputError(
                f"{what} needs {module}, which fails to import ({' '.join(str(err).split())}): "
                f"reinstall it: {install}") from None
        except Exception as err:  # any failure at import time is the same fault
            raise HesslensInputError(
                f"{what} needs {module}, which fails to import ({type(err).__name__}: "
                f"{' '.join(str(err).split())}): reinstall it: {install}") from None


def writable_out_dir(path: str | os.PathLike[str] | None, option: str = "--out") -> Path:
    """``path`` as a ``Path`` if a command can write its results there, creating nothing: not
    empty, not a file, and either a writable folder or one that can be created (its nearest
    existing parent is a writable folder)."""
    out = check_out_dir(path, option)
    if out.exists():
        if not os.access(out, os.W_OK | os.X_OK):
            raise HesslensInputError(f"the output folder {out} is not writable: choose another "
                                     f"{option}")
        return out
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise HesslensInputError(
            f"cannot create the output folder {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise HesslensInputError(
            f"cannot create the output folder {out}: {parent} is not writable; choose another "
            f"{option}")
    return out


@dataclass(frozen=True)
class Ready:
    """What :func:`check_ready` found: the output folder (``None`` if none was asked about)
    and the device."""

    out: Path | None
    device: torch.device


def check_ready(*, out: str | os.PathLike[str] | None = None, device: str | None = "cpu",
                needs: Mapping[str, str] | None = None, option: str = "--out") -> Ready:
    """The checks every command makes first, cheapest first: the modules it will import
    (:func:`require`), the device (:func:`~hesslens.experiments.common.resolve_device`), and
    the output folder when ``out`` is given (:func:`writable_out_dir`). Creates nothing."""
    require(needs or {})
    resolved = resolve_device(device)
    folder = None if out is None else writable_out_dir(out, option)
    return Ready(folder, resolved)
