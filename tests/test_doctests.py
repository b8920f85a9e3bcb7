"""The runnable examples in every module's docstrings must run and give what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import hesslens

MODULES = ["hesslens"] + [
    m.name for m in pkgutil.walk_packages(hesslens.__path__, prefix="hesslens.")
    if m.name != "hesslens.__main__"
]
# These subpackages promise an example in every module.
EXAMPLE_IN_EVERY_MODULE = ("hesslens.linalg", "hesslens.zoo")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    if name.startswith(EXAMPLE_IN_EVERY_MODULE):
        assert result.attempted > 0, f"{name} has no runnable example"
