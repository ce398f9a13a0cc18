"""groupnorm.keras on the JAX and PyTorch Keras backends, one process each (see keras_backend_check.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import run_python

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_layer_on_backend(backend: str) -> None:
    result = run_python(str(TESTS / "keras_backend_check.py"), backend, KERAS_BACKEND=backend)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"groupnorm.keras OK on {backend}" in result.stdout
