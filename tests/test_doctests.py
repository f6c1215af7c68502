"""The runnable examples in the docstrings of the method core, the settings and the plan options
run as tests (quick tier), and every public core function has one (shapes and a small example)."""
from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import nnunet_stseg.core

# every module of the method core: a new one is checked without being listed here
CORE = sorted(f"nnunet_stseg.core.{m.name}" for m in pkgutil.iter_modules(nnunet_stseg.core.__path__))
WITH_EXAMPLES = CORE + ["nnunet_stseg.settings", "nnunet_stseg.adapters.config", "nnunet_stseg.adapters.results",
                          "nnunet_stseg.adapters.compat", "benchmarks.experiment_recall", "benchmarks.coarse_grid_sweep",
                          "nnunet_stseg.adapters.predictor", "nnunet_stseg.adapters.inference_io"]


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


@pytest.mark.parametrize("name", CORE)
def test_every_public_core_function_has_an_example(name):
    module = importlib.import_module(name)
    public = [getattr(module, n) for n in getattr(module, "__all__", dir(module)) if not n.startswith("_")]
    functions = [f for f in public if inspect.isfunction(f) and f.__module__ == name]
    missing = [f.__name__ for f in functions if ">>>" not in (f.__doc__ or "")]
    assert functions and missing == []
