"""Helpers shared by the TensorFlow and Keras tests: float64 reference gradients for a configuration."""

from __future__ import annotations

from typing import Any

import numpy as np

import groupnorm.numpy as gnp
from support import Config


def f64(a: Any) -> np.ndarray | None:
    return None if a is None else np.asarray(a, np.float64)


def reference_grads(cfg: Config, arrays: dict[str, Any]) -> gnp.Gradients:
    """Gradients of ``sum(y * cotangent)`` in float64 from the NumPy reference backend."""
    return gnp.vjp(
        f64(arrays["x"]),
        f64(arrays["cotangent"]),
        gamma=f64(arrays["gamma"]),
        beta=f64(arrays["beta"]),
        **cfg.kwargs(),
    )


def scaled_tolerance(reference: np.ndarray, rel: float) -> float:
    """An absolute tolerance of ``rel`` times the reference's magnitude (at least 1)."""
    return rel * max(1.0, float(np.max(np.abs(reference))) if reference.size else 1.0)
