"""The runnable examples in the analysis package's docstrings give what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import hesslens.analysis

MODULES = ["hesslens.analysis"] + [
    f"hesslens.analysis.{m.name}" for m in pkgutil.iter_modules(hesslens.analysis.__path__)
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_tracker_similarity_is_registered():
    from hesslens.training import tracking

    assert tracking._DEFAULT_SIMILARITY is hesslens.analysis.spectrum_similarity
