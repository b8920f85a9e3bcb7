"""The runnable examples in the training package's docstrings (and the CLI pieces') must run."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import hesslens.training

MODULES = ["hesslens.training"] + [
    f"hesslens.training.{m.name}" for m in pkgutil.iter_modules(hesslens.training.__path__)
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
