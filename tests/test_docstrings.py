"""The examples in the modules' docstrings are run, so none of them can say what the code does not."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["cli", "model", "objective", "reward"])
def test_the_examples_in_docstrings_hold(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
