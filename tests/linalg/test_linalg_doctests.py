"""The examples in the docstrings run and give what they show."""

import doctest
import importlib

import pytest

MODULES = [
    "hesslens.linalg",
    "hesslens.linalg.operator",
    "hesslens.linalg.probes",
    "hesslens.linalg.results",
    "hesslens.linalg.lanczos",
    "hesslens.linalg.trace",
    "hesslens.linalg.spectrum",
    "hesslens.linalg.slq",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
