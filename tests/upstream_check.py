"""Run a framework's own GroupNorm test file, unchanged, with its GroupNorm class swapped for groupnorm's.

``python upstream_check.py SUITE=FILE ...`` (in its own process: the swap is for the whole process, and
Keras reads ``KERAS_BACKEND`` at import) imports each ``FILE`` as a module after replacing the
framework's class by groupnorm's, runs the selected test cases with ``unittest`` and prints one line,
``UPSTREAM`` and a JSON object: ``{SUITE: {"passed": [...], "failed": {name: text}}}``.

Suites:

- ``keras``: ``keras.layers.GroupNormalization`` (and ``keras.src.layers``'s) -> ``groupnorm.keras``;
  every case of Keras's ``group_normalization_test.py``.
- ``flax-nnx``: ``flax.nnx.GroupNorm`` -> ``groupnorm.flax.GroupNorm`` and ``flax.linen.GroupNorm`` ->
  ``groupnorm.flax.linen.GroupNorm``; the cases of Flax's ``tests/nnx/nn/normalization_test.py`` whose
  name says groupnorm.
- ``flax-linen``: the same swap; the GroupNorm cases of Flax's ``tests/linen/linen_test.py`` (those named
  for group norm, and the normalization equivalences, which compare a GroupNorm with LayerNorm or
  InstanceNorm: those whose parameters hold a GroupNorm).

``--own`` runs the same selection without the swap (the framework's own class), for comparison.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import traceback
import unittest
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any


def _swap_keras() -> None:
    import keras
    from keras.src import layers as src_layers

    from groupnorm.keras import GroupNormalization

    keras.layers.GroupNormalization = GroupNormalization
    src_layers.GroupNormalization = GroupNormalization


def _swap_flax() -> None:
    import flax.linen
    from flax import nnx

    import groupnorm.flax
    import groupnorm.flax.linen

    nnx.GroupNorm = groupnorm.flax.GroupNorm
    flax.linen.GroupNorm = groupnorm.flax.linen.GroupNorm


def _keras_cases(case: unittest.TestCase) -> bool:
    return case._testMethodName.startswith("test")


def _nnx_cases(case: unittest.TestCase) -> bool:
    return "groupnorm" in case._testMethodName


def _linen_cases(case: unittest.TestCase) -> bool:
    name = case._testMethodName
    return "group_norm" in name or (name.startswith("test_normalization_equivalence") and "GroupNorm(" in case.id())


SUITES: dict[str, tuple[Callable[[], None], Callable[[unittest.TestCase], bool]]] = {
    "keras": (_swap_keras, _keras_cases),
    "flax-nnx": (_swap_flax, _nnx_cases),
    "flax-linen": (_swap_flax, _linen_cases),
}


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"upstream_{path.stem}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _cases(suite: unittest.TestSuite) -> Iterator[unittest.TestCase]:
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _cases(item)
        else:
            yield item


class _Result(unittest.TestResult):
    def __init__(self) -> None:
        super().__init__()
        self.passed: list[str] = []
        self.failed: dict[str, str] = {}

    def addSuccess(self, test: unittest.TestCase) -> None:
        self.passed.append(test._testMethodName)

    def _fail(self, test: unittest.TestCase, err: Any) -> None:
        text = "".join(traceback.format_exception(*err))
        self.failed[test._testMethodName] = text[-1500:]

    addFailure = addError = _fail


def run_suite(suite_name: str, file_name: str, *, own: bool = False) -> dict[str, Any]:
    """Run one suite on one file: ``{"passed": [names], "failed": {name: traceback}}``."""
    swap, select = SUITES[suite_name]
    if not own:
        swap()
    module = _load(Path(file_name))
    loaded = unittest.defaultTestLoader.loadTestsFromModule(module)
    chosen = [case for case in _cases(loaded) if select(case)]
    result = _Result()
    unittest.TestSuite(chosen).run(result)
    return {"passed": sorted(result.passed), "failed": result.failed}


def main(argv: list[str]) -> int:
    """``SUITE=FILE ... [--own]``: one JSON line, ``{SUITE: run_suite(SUITE, FILE)}``, after ``UPSTREAM``."""
    own = "--own" in argv
    pairs = [arg.split("=", 1) for arg in argv if arg != "--own"]
    results = {suite: run_suite(suite, path, own=own) for suite, path in pairs}
    print("UPSTREAM " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
