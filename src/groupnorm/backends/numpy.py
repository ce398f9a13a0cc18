"""NumPy backend: executes a plan, and is the project's reference forward and backward pass.

Statistics accumulate in float32 for float16/bfloat16/float32 input and in float64 for float64 input.
The default (stable) variance shifts each group by its rough mean ``K`` first: ``x - K`` is exact in
floating point for values near the mean, so the mean and variance of the shifted values lose nothing
to a large mean, and the output is formed as ``(x - K) * scale + offset`` for the same reason.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import numpy as np
from numpy.typing import NDArray

from groupnorm._api import Backend, plan_for
from groupnorm._plan import Activation, Plan, resolve_activation

NAME = "numpy"

__all__ = ["Gradients", "execute", "forward", "vjp"]

Array = NDArray[Any]


def is_array(x: object) -> bool:
    return isinstance(x, np.ndarray)


def static_shape(x: Array) -> tuple[int | None, ...]:
    return tuple(x.shape)


def dtype_name(x: Array) -> str:
    return str(x.dtype.name)


def _work_dtype(dtype: np.dtype[Any]) -> type[np.floating[Any]]:
    return np.float64 if dtype == np.float64 else np.float32


def _statistics(plan: Plan, x: Array, work: type[np.floating[Any]]) -> tuple[Array | None, Array, Array]:
    """``(shift, mean, rstd)`` in the plan's stats shape: ``mean`` is the mean of ``x - shift``."""
    xv = x.reshape(plan.view_shape(x.shape))
    axes = plan.view_reduce_axes
    n = plan.group_size
    shift: Array | None
    with np.errstate(invalid="ignore", over="ignore"):
        if plan.mean_close_to_zero:
            shift = None
            s1 = np.sum(xv, axis=axes, dtype=work, keepdims=True)
            s2 = np.sum(np.square(xv, dtype=work), axis=axes, keepdims=True)
        else:
            shift = np.mean(xv, axis=axes, dtype=work, keepdims=True)
            d = np.subtract(xv, shift, dtype=work)
            s1 = np.sum(d, axis=axes, keepdims=True)
            s2 = np.sum(np.square(d, out=d), axis=axes, keepdims=True)
        mean = s1 / n
        var = np.maximum(s2 / n - np.square(mean), 0)
        rstd = 1 / np.sqrt(var + work(plan.epsilon))
    stats = plan.stats_shape(x.shape)
    return (None if shift is None else shift.reshape(stats)), mean.reshape(stats), rstd.reshape(stats)


def _exact_statistics(plan: Plan, x: Array) -> tuple[type[np.floating[Any]], tuple[Array | None, Array, Array]]:
    """The work dtype and :func:`_statistics`; float64 where float32 squares overflowed (rstd 0 or NaN
    on finite input: values beyond about 1e19), so that the result exists wherever the math has one."""
    work = _work_dtype(x.dtype)
    stats = _statistics(plan, x, work)
    if work is not np.float64 and not bool(np.all(stats[2] > 0)) and bool(np.isfinite(x).all()):
        work = np.float64
        stats = _statistics(plan, x, work)
    return work, stats


def _param(p: Any, plan: Plan, work: type[np.floating[Any]]) -> Array | None:
    return None if p is None else np.asarray(p, dtype=work).reshape(plan.param_shape)


def _erf(x: Array) -> Array:
    try:
        from scipy.special import erf
    except ImportError:  # pragma: no cover - scipy comes with the jax extra
        return np.vectorize(math.erf, otypes=[x.dtype])(x)  # type: ignore[no-any-return]
    return erf(x)  # type: ignore[no-any-return]


def _relu(y: Array) -> None:
    np.maximum(y, 0, out=y)


def _silu(y: Array) -> None:
    with np.errstate(over="ignore"):
        y /= 1 + np.exp(-y)


def _gelu(y: Array) -> None:
    y *= 0.5 * (1 + _erf(y / math.sqrt(2)))


def _relu_grad(p: Array) -> Array:
    return (p > 0).astype(p.dtype)


def _silu_grad(p: Array) -> Array:
    with np.errstate(over="ignore"):
        s = 1 / (1 + np.exp(-p))
    return s * (1 + p * (1 - s))  # type: ignore[no-any-return]


def _gelu_grad(p: Array) -> Array:
    cdf = 0.5 * (1 + _erf(p / math.sqrt(2)))
    return cdf + p * np.exp(-0.5 * p * p) / math.sqrt(2 * math.pi)  # type: ignore[no-any-return]


_FUSED: dict[str, Callable[[Array], None]] = {"relu": _relu, "silu": _silu, "gelu": _gelu}
_FUSED_GRAD: dict[str, Callable[[Array], Array]] = {"relu": _relu_grad, "silu": _silu_grad, "gelu": _gelu_grad}


def execute(plan: Plan, x: Array, gamma: Any, beta: Any, activation: Activation) -> Array:
    """Run a validated plan on a NumPy array; ``gamma``/``beta`` are ``[C]`` array-likes or None."""
    if x.size == 0:
        return np.empty_like(x)
    work, (shift, mean, rstd) = _exact_statistics(plan, x)
    g, b = _param(gamma, plan, work), _param(beta, plan, work)
    scale = rstd if g is None else rstd * g
    offset = -mean * scale if b is None else b - mean * scale
    xs = x.reshape(plan.split_shape(x.shape))
    with np.errstate(invalid="ignore", over="ignore"):
        if shift is None:
            y = np.multiply(xs, scale, dtype=work)
        else:
            y = np.subtract(xs, shift, dtype=work)
            y *= scale
        y += offset
        if isinstance(activation, str):
            _FUSED[activation](y)
    out = y.reshape(x.shape).astype(x.dtype, copy=False)
    return activation(out) if callable(activation) else out


def forward(
    inputs: Any,
    groups: int = 32,
    channels_axis: int = -1,
    reduction_axes: int | Sequence[int] = (-3, -2),
    *,
    gamma: Any = None,
    beta: Any = None,
    epsilon: float = 1e-6,
    activation_fn: Activation = None,
    mean_close_to_zero: bool = False,
) -> Array:
    """:func:`groupnorm.group_norm` for anything ``numpy.asarray`` accepts; returns a NumPy array."""
    x = np.asarray(inputs)
    plan = plan_for(
        _SELF,
        x,
        groups=groups,
        channels_axis=channels_axis,
        reduction_axes=reduction_axes,
        gamma=None if gamma is None else np.asarray(gamma),
        beta=None if beta is None else np.asarray(beta),
        epsilon=epsilon,
        mean_close_to_zero=mean_close_to_zero,
    )
    return execute(plan, x, gamma, beta, resolve_activation(activation_fn))


class Gradients(NamedTuple):
    """Gradients of a scalar loss with respect to :func:`forward`'s input and parameters."""

    inputs: Array
    gamma: Array | None
    """``None`` where no ``gamma`` was given."""
    beta: Array | None
    """``None`` where no ``beta`` was given."""


def vjp(
    inputs: Any,
    cotangent: Any,
    groups: int = 32,
    channels_axis: int = -1,
    reduction_axes: int | Sequence[int] = (-3, -2),
    *,
    gamma: Any = None,
    beta: Any = None,
    epsilon: float = 1e-6,
    activation_fn: Activation = None,
    mean_close_to_zero: bool = False,
) -> Gradients:
    """The vector-Jacobian product of :func:`forward`: given ``cotangent`` (dL/dy, the output's shape),
    return dL/d``inputs``, dL/d``gamma`` and dL/d``beta``, each in its argument's dtype.

    ``activation_fn`` may be None or a fusable name (``"relu"``, ``"silu"``, ``"gelu"``), not a callable.
    """
    x = np.asarray(inputs)
    gamma = None if gamma is None else np.asarray(gamma)
    beta = None if beta is None else np.asarray(beta)
    plan = plan_for(
        _SELF,
        x,
        groups=groups,
        channels_axis=channels_axis,
        reduction_axes=reduction_axes,
        gamma=gamma,
        beta=beta,
        epsilon=epsilon,
        mean_close_to_zero=mean_close_to_zero,
    )
    activation = resolve_activation(activation_fn)
    if callable(activation):
        raise TypeError("vjp takes activation_fn as None or one of 'relu', 'silu', 'gelu', not a callable.")
    dy = np.asarray(cotangent)
    if dy.shape != x.shape:
        raise ValueError(f"cotangent must have the input's shape {x.shape}, got {dy.shape}.")

    work, stats = (_work_dtype(x.dtype), None) if x.size == 0 else _exact_statistics(plan, x)
    g, b = _param(gamma, plan, work), _param(beta, plan, work)
    channel_axes = (plan.channels_axis, plan.channels_axis + 1)
    other_axes = tuple(a for a in range(plan.rank + 1) if a not in channel_axes)
    split = plan.split_shape(x.shape)
    with np.errstate(invalid="ignore", over="ignore"):
        if x.size == 0:
            xhat = np.zeros(split, work)
            rstd = np.zeros(plan.stats_shape(x.shape), work)
        else:
            assert stats is not None
            shift, mean, rstd = stats
            xs = x.reshape(split)
            centered = np.subtract(xs, shift, dtype=work) if shift is not None else xs.astype(work)
            xhat = (centered - mean) * rstd
        dys = dy.reshape(split).astype(work)
        if activation is not None:
            pre = xhat * (1 if g is None else g) + (0 if b is None else b)
            dys = dys * _FUSED_GRAD[activation](pre)
        dbeta = None if beta is None else dys.sum(axis=other_axes).reshape(-1).astype(beta.dtype)
        dgamma = None if gamma is None else (dys * xhat).sum(axis=other_axes).reshape(-1).astype(gamma.dtype)
        dxhat = dys if g is None else dys * g
        if x.size == 0:
            dx = dxhat
        else:
            axes = plan.split_reduce_axes
            m1 = dxhat.mean(axis=axes, keepdims=True)
            m2 = (dxhat * xhat).mean(axis=axes, keepdims=True)
            dx = rstd * (dxhat - m1 - xhat * m2)
    return Gradients(dx.reshape(x.shape).astype(x.dtype, copy=False), dgamma, dbeta)


_SELF = cast(Backend, sys.modules[__name__])
