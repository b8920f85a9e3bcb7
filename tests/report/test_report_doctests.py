"""The runnable examples in the report package's docstrings give what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import hesslens.report

MODULES = ["hesslens.report", "hesslens.experiments.common"] + [
    f"hesslens.report.{m.name}" for m in pkgutil.iter_modules(hesslens.report.__path__)
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
