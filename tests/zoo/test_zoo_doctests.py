"""The runnable examples in the zoo's docstrings must run and give what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import hesslens.zoo

MODULES = ["hesslens.zoo"] + [
    f"hesslens.zoo.{m.name}" for m in pkgutil.iter_modules(hesslens.zoo.__path__)
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_every_module_has_an_example():
    for name in MODULES:
        finder = doctest.DocTestFinder()
        assert any(t.examples for t in finder.find(importlib.import_module(name))), name
