"""groupnorm.keras on every Keras backend, one process each (see keras_backend_check.py): the project's
own checks on the JAX and PyTorch backends (TensorFlow's run in test_keras.py), and on all three Keras's
own GroupNormalization test file, unchanged, with groupnorm's class swapped in."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fetch_upstream import require, upstream_files
from support import run_python

TESTS = Path(__file__).resolve().parent

#: Keras's test cases that exercise a deliberate difference (see docs/tensorflow.md): none.
DIFFERENCES: frozenset[str] = frozenset()


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_keras_layer_on_backend(backend: str) -> None:
    args = [str(TESTS / "keras_backend_check.py"), backend]
    if backend == "tensorflow":
        args.append("--no-checks")
    upstream = upstream_files()["keras"]
    if upstream is not None or backend == "tensorflow":
        upstream = require("keras")
        args += ["--upstream", str(upstream)]
    result = run_python(*args, KERAS_BACKEND=backend)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if backend != "tensorflow":
        assert f"groupnorm.keras OK on {backend}" in result.stdout
    if upstream is None:
        require("keras")  # the own checks passed; skip (or fail) for want of Keras's file
        return
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("UPSTREAM "))
    outcome = json.loads(line.removeprefix("UPSTREAM "))["keras"]
    failed = set(outcome["failed"]) - DIFFERENCES
    assert not failed, "\n\n".join(outcome["failed"][name] for name in sorted(failed))
    every = set(re.findall(r"^    def (test\w+)\(", upstream.read_text(), flags=re.MULTILINE))
    assert every and set(outcome["passed"]) == every - DIFFERENCES
