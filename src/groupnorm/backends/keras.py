"""Keras 3 backend: executes a plan with ``keras.ops``, so it runs on every Keras backend.

On the TensorFlow Keras backend, :func:`execute` hands tensors to :mod:`groupnorm.backends.tensorflow`
(XLA-compiled, with a hand-written gradient) unless ``portable=True``; on JAX, PyTorch and others the
plan runs as ``keras.ops`` and is differentiated by the backend's autodiff. The numerics are those of
every groupnorm backend: statistics in float32 (float64 for float64 input), the default mode shifts each
group by its rough mean before summing, and the output is formed from the shifted input. float32 sums
are scaled by an exact power of two per group before squaring (chosen from a few elements at the
group's corner), so spreads beyond the range of float32 squares (about 1.8e19) keep an exact result.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from groupnorm._plan import Activation, Plan

NAME = "keras"

__all__ = ["NAME", "dtype_name", "execute", "static_shape"]


def static_shape(x: Any) -> tuple[int | None, ...] | None:
    shape = getattr(x, "shape", None)
    if shape is None:
        return None
    try:
        dims = tuple(shape)
    except (TypeError, ValueError):  # a TensorShape of unknown rank
        return None
    return tuple(None if d is None else int(d) for d in dims)


def dtype_name(x: Any) -> str:
    return str(keras.backend.standardize_dtype(x.dtype))


def _activate(name: str | None, y: Any) -> Any:
    if name is None:
        return y
    if name == "relu":
        return ops.relu(y)
    if name == "silu":
        return ops.silu(y)
    return ops.gelu(y, approximate=False)


def _sum(t: Any, axes: tuple[int, ...]) -> Any:
    return ops.sum(t, axis=axes, keepdims=True)


#: how many elements along the innermost reduced axis of the statistics view the corner spans
_CORNER = 8


def _power_of_two(deviation: Any) -> tuple[Any, Any]:
    """``(2**-e, 2**e)`` for ``e`` the binary exponent of each float32 ``deviation >= 0``, clamped to
    ``[0, 126]`` (so never scaling up, and both factors normal): exact scale factors from the bits."""
    e = ops.clip(ops.right_shift(ops.view(deviation, "int32"), 23) - 127, 0, 126)
    down = ops.view(ops.left_shift(127 - e, 23), "float32")
    up = ops.view(ops.left_shift(127 + e, 23), "float32")
    return down, up


def execute(plan: Plan, x: Any, gamma: Any, beta: Any, activation: Activation, *, portable: bool = False) -> Any:
    """Run a validated plan on a tensor of the current Keras backend; ``gamma``/``beta`` are ``[C]``
    tensors or variables, or None. ``portable=True`` uses ``keras.ops`` even on TensorFlow."""
    if not portable and keras.backend.backend() == "tensorflow":
        from groupnorm.backends import tensorflow as tf_backend

        return tf_backend.execute(plan, x, gamma, beta, activation)

    work = "float64" if plan.dtype == "float64" else "float32"
    dims = list(ops.shape(x))
    n = float(max(plan.group_size, 1))
    axes = plan.view_reduce_axes
    v = ops.cast(ops.reshape(x, plan.view_shape(dims)), work)
    stats = plan.stats_shape(dims)
    if plan.mean_close_to_zero:
        shift = None
        d = v
        corner = v[plan.corner_index(len(v.shape), _CORNER)]
    else:
        shift = _sum(v, axes) / n
        d = v - shift
        corner = v[plan.corner_index(len(v.shape), _CORNER)] - shift
    epsilon = ops.cast(plan.epsilon, work)
    if work == "float32":
        # beyond ~1.8e19 squares overflow float32: sum (x - K) * 2**-e, exactly scaled
        down, up = _power_of_two(ops.stop_gradient(ops.max(ops.abs(corner), axis=axes, keepdims=True)))
        d = d * down
        # eps * 4**-e, kept normal (it underflows for e > ~55, where only a zero variance sees it)
        epsilon = ops.maximum(epsilon * down * down, min(plan.epsilon, 2.0**-126))
    mean = _sum(d, axes) / n
    var = ops.maximum(_sum(ops.square(d), axes) / n - ops.square(mean), 0.0)
    rstd = ops.rsqrt(var + epsilon)
    if work == "float32":
        mean, rstd = mean * up, rstd * down
    mean, rstd = ops.reshape(mean, stats), ops.reshape(rstd, stats)

    scale = rstd if gamma is None else rstd * ops.reshape(ops.cast(gamma, work), plan.param_shape)
    offset = -mean * scale
    if beta is not None:
        offset = offset + ops.reshape(ops.cast(beta, work), plan.param_shape)
    xs = ops.cast(ops.reshape(x, plan.split_shape(dims)), work)
    centered = xs if shift is None else xs - ops.reshape(shift, stats)
    y = _activate(activation if isinstance(activation, str) else None, centered * scale + offset)
    out = ops.cast(ops.reshape(y, dims), x.dtype)
    return activation(out) if callable(activation) else out
