"""TensorFlow backend: executes a plan on ``tf.Tensor`` / ``tf.Variable`` inputs.

Works eagerly, inside ``tf.function`` (dynamic batch dimensions included, without retracing per batch
size), under ``jit_compile=True``, in ``tf.compat.v1`` graphs and in SavedModels. Statistics accumulate in
float32 for float16/bfloat16/float32 input and in float64 for float64 input.

The computation is one small function per (plan, activation, parameter dtypes), compiled with XLA by
default (:data:`JIT_COMPILE`), with a hand-written gradient:

* default mode: a first reduction gives each group's rough mean ``K``; one more reduction gives the sum
  and the sum of squares of ``x - K`` (exact near the mean, so a large mean loses nothing), and one
  fused elementwise pass forms ``(x - K) * scale + offset`` with per-channel ``scale = rstd * gamma``,
  ``offset = beta - mean(x - K) * scale``, then the fused activation.
* ``mean_close_to_zero``: the same without the shift (one reduction pass), variance clamped at zero.
* float32 statistics beyond the range of float32 squares (spreads above about 1.8e19): before squaring,
  the summed values are scaled by a power of two ``2**-e`` per group, ``e >= 0`` the exponent of the
  largest ``|x - K|`` (``|x|`` for ``mean_close_to_zero``) among a few elements at the group's corner.
  The scaling is exact, so ordinary data gives the same statistics as without it; the mean is scaled
  back and ``rstd = rsqrt(var_s + eps * 4**-e) * 2**-e``, which never forms the overflowing variance.
* gradient: two reductions per (kept index, channel) -- of ``dy`` and of ``dy * xhat`` -- give the
  gradients of ``beta`` and ``gamma`` and the two group means the input gradient needs, which is then one
  fused elementwise pass, ``rstd * (gamma * dy - m1 - xhat * m2)`` (never ``rstd * rstd``, which
  underflows where the spread is beyond about 1e19).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import tensorflow as tf

from groupnorm._plan import Activation, Plan

try:
    from tensorflow.compiler.tf2xla.python.xla import optimization_barrier as _optimization_barrier
except ImportError:  # pragma: no cover - present in every TensorFlow this package supports
    _optimization_barrier = None
else:
    # the barrier is an identity: let gradients through it (higher-order gradients differentiate the
    # hand-written gradient, which uses it); TensorFlow or another library may have registered it
    with contextlib.suppress(KeyError):
        tf.RegisterGradient("XlaOptimizationBarrier")(lambda op, *grads: list(grads))

NAME = "tensorflow"

__all__ = ["JIT_COMPILE", "NAME", "dtype_name", "execute", "is_array", "static_shape"]

#: compile the group normalization function with XLA (``jit_compile=True``). XLA fuses the statistics
#: and the output pass; turn it off only where XLA is not available.
JIT_COMPILE = True


def is_array(x: object) -> bool:
    return isinstance(x, tf.Tensor | tf.Variable)


def static_shape(x: Any) -> tuple[int | None, ...] | None:
    shape = tf.TensorShape(x.shape)
    if shape.rank is None:
        return None
    return tuple(shape.as_list())


def dtype_name(x: Any) -> str:
    return str(tf.as_dtype(x.dtype).base_dtype.name)


def _work_dtype(dtype: tf.DType) -> tf.DType:
    return tf.float64 if dtype == tf.float64 else tf.float32


def _dims(x: tf.Tensor) -> list[Any]:
    """The input's shape: static ints where known, scalar tensors where dynamic."""
    static: list[Any] = list(x.shape.as_list())
    if all(d is not None for d in static):
        return static
    dynamic = tf.shape(x)
    return [dynamic[i] if d is None else d for i, d in enumerate(static)]


#: how many elements along the innermost reduced axis of the statistics view the corner spans
_CORNER = 8
#: float32's smallest normal number, 2**-126
_F32_TINY = 2.0**-126


def _power_of_two(deviation: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(2**-e, 2**e)`` for ``e`` the binary exponent of each float32 ``deviation >= 0``, clamped to
    ``[0, 126]`` (so never scaling up, and both factors normal): exact scale factors from the bits."""
    e = tf.clip_by_value(tf.bitwise.right_shift(tf.bitcast(deviation, tf.int32), 23) - 127, 0, 126)
    down = tf.bitcast(tf.bitwise.left_shift(127 - e, 23), tf.float32)
    up = tf.bitcast(tf.bitwise.left_shift(127 + e, 23), tf.float32)
    return down, up


def _reduce_sums(ts: Sequence[tf.Tensor], axes: Sequence[int], staged: bool) -> list[tf.Tensor]:
    """Sums of each of ``ts`` (same shape) over ``axes``, keepdims.

    Where the innermost axis is reduced along with others, it is summed first (a contiguous row
    reduction, which XLA's CPU code generator vectorises well), the partial sums are materialised, and
    the rest is summed from them: one strided reduction of a fused elementwise producer is several
    times slower on CPU than the two stages together.
    """
    axes = sorted(axes)
    last = len(ts[0].shape) - 1
    if staged and _optimization_barrier is not None and len(axes) > 1 and axes[-1] == last:
        ts = list(_optimization_barrier(*(tf.reduce_sum(t, axis=last, keepdims=True) for t in ts)))
        axes = axes[:-1]
    return [tf.reduce_sum(t, axis=axes, keepdims=True) for t in ts]


def _activate(name: str | None, y: tf.Tensor) -> tf.Tensor:
    if name is None:
        return y
    if name == "relu":
        return tf.nn.relu(y)
    if name == "silu":
        return y * tf.sigmoid(y)
    return 0.5 * y * (1.0 + tf.math.erf(y * (1.0 / math.sqrt(2.0))))


def _activation_grad(name: str, pre: tf.Tensor) -> tf.Tensor:
    """d activation / d pre-activation."""
    if name == "relu":
        return tf.cast(pre > 0, pre.dtype)
    if name == "silu":
        s = tf.sigmoid(pre)
        return s * (1.0 + pre * (1.0 - s))
    cdf = 0.5 * (1.0 + tf.math.erf(pre * (1.0 / math.sqrt(2.0))))
    return cdf + pre * tf.exp(-0.5 * pre * pre) * (1.0 / math.sqrt(2.0 * math.pi))


def _build(plan: Plan, activation: str | None, has_gamma: bool, has_beta: bool, jit: bool) -> Callable[..., tf.Tensor]:
    """The group normalization of ``plan`` as a function of ``(x, *params)`` with its gradient; ``jit``:
    formulated for XLA."""

    def reduce_sum(t: tf.Tensor, axes: Sequence[int]) -> tf.Tensor:
        return _reduce_sums([t], axes, jit)[0]

    reduce_view = plan.view_reduce_axes
    split_reduce = plan.split_reduce_axes
    c = plan.channels_axis
    # per (kept index, channel) sums: every reduced split axis except the within-group one
    coef_reduce = tuple(a for a in split_reduce if a != c + 1)
    # from coefficient shape to per-channel: every axis but the two channel axes
    channel_sum = tuple(a for a in range(plan.rank + 1) if a not in (c, c + 1))
    n = float(max(plan.group_size, 1))

    def statistics(x: tf.Tensor, work: tf.DType) -> tuple[tf.Tensor | None, tf.Tensor, tf.Tensor]:
        dims = _dims(x)
        v = tf.cast(tf.reshape(x, plan.view_shape(dims)), work)
        stats = plan.stats_shape(dims)
        if plan.mean_close_to_zero:
            shift = None
            d = v
            corner = v[plan.corner_index(len(v.shape), _CORNER)]
        else:
            shift = reduce_sum(v, reduce_view) * (1.0 / n)
            d = v - shift
            corner = v[plan.corner_index(len(v.shape), _CORNER)] - shift
        epsilon = tf.constant(plan.epsilon, work)
        if work == tf.float32:
            # beyond ~1.8e19 squares overflow float32: sum (x - K) * 2**-e, exactly scaled
            deviation = tf.reduce_max(tf.abs(corner), axis=reduce_view, keepdims=True)
            down, up = _power_of_two(tf.stop_gradient(deviation))
            d = d * down
            # eps * 4**-e, kept normal (it underflows for e > ~55, where only a zero variance sees it)
            epsilon = tf.maximum(epsilon * down * down, min(plan.epsilon, _F32_TINY))
        s1, s2 = _reduce_sums([d, tf.square(d)], reduce_view, jit)
        mean = s1 * (1.0 / n)
        var = tf.maximum(s2 * (1.0 / n) - tf.square(mean), 0.0)
        rstd = tf.math.rsqrt(var + epsilon)
        if work == tf.float32:
            mean, rstd = mean * up, rstd * down
        return (
            None if shift is None else tf.reshape(shift, stats),
            tf.reshape(mean, stats),
            tf.reshape(rstd, stats),
        )

    def split_params(params: Sequence[tf.Tensor], work: tf.DType) -> tuple[tf.Tensor | None, tf.Tensor | None]:
        it = iter(params)
        gamma = tf.reshape(tf.cast(next(it), work), plan.param_shape) if has_gamma else None
        beta = tf.reshape(tf.cast(next(it), work), plan.param_shape) if has_beta else None
        return gamma, beta

    def prepare(x: tf.Tensor, params: Sequence[tf.Tensor]) -> tuple[Any, ...]:
        work = _work_dtype(x.dtype)
        dims = _dims(x)
        shift, mean, rstd = statistics(x, work)
        gamma, beta = split_params(params, work)
        xs = tf.cast(tf.reshape(x, plan.split_shape(dims)), work)
        centered = xs if shift is None else xs - shift
        return work, dims, mean, rstd, gamma, beta, centered

    def forward(x: tf.Tensor, *params: tf.Tensor) -> tuple[tf.Tensor, Callable[..., Any]]:
        work, dims, mean, rstd, gamma, beta, centered = prepare(x, params)
        scale = rstd if gamma is None else rstd * gamma
        offset = -mean * scale if beta is None else beta - mean * scale
        y = tf.reshape(tf.cast(_activate(activation, centered * scale + offset), x.dtype), dims)

        def grad(dy: tf.Tensor) -> tuple[tf.Tensor, ...]:
            dys = tf.cast(tf.reshape(dy, plan.split_shape(dims)), work)
            xhat = (centered - mean) * rstd
            if activation is not None:
                pre = xhat if gamma is None else xhat * gamma
                if beta is not None:
                    pre = pre + beta
                dys = dys * _activation_grad(activation, pre)
            # per (kept index, channel): sums of dL/dpre and of dL/dpre * xhat
            a, b = _reduce_sums([dys, dys * xhat], coef_reduce, jit)
            ga = a if gamma is None else a * gamma
            gb = b if gamma is None else b * gamma
            m1 = tf.reduce_sum(ga, axis=c + 1, keepdims=True) * (1.0 / n)
            m2 = tf.reduce_sum(gb, axis=c + 1, keepdims=True) * (1.0 / n)
            # dx = rstd * (g * dpre - m1 - xhat * m2), one fused pass over dpre and x - K, with
            # per-group factors that stay in range: the coefficient of x - K itself would be
            # rstd * rstd * m2, which underflows for spreads beyond ~1e19
            if jit:
                p = rstd if gamma is None else rstd * gamma
                t = rstd * m2
                r = (mean * rstd) * t - rstd * m1
                dx = dys * p - (centered * rstd) * t + r
            else:
                # TensorFlow's graph optimizer regroups chains of products by operand size (XLA does
                # not): here no small factor may multiply two others
                dx = ((dys if gamma is None else dys * gamma) - m1 - xhat * m2) * rstd
            dx = tf.reshape(tf.cast(dx, x.dtype), dims)
            grads = [dx]
            if has_gamma:
                grads.append(tf.cast(tf.reshape(tf.reduce_sum(b, axis=channel_sum), [-1]), params[0].dtype))
            if has_beta:
                grads.append(tf.cast(tf.reshape(tf.reduce_sum(a, axis=channel_sum), [-1]), params[-1].dtype))
            return tuple(grads)

        return y, grad

    return tf.custom_gradient(forward)  # type: ignore[no-any-return]


@lru_cache(maxsize=256)
def _function(
    plan: Plan, activation: str | None, param_dtypes: tuple[tf.DType | None, tf.DType | None], jit: bool
) -> Callable[..., tf.Tensor]:
    gamma_dtype, beta_dtype = param_dtypes
    core = _build(plan, activation, gamma_dtype is not None, beta_dtype is not None, jit)
    signature = [tf.TensorSpec(plan.shape, tf.as_dtype(plan.dtype))]
    signature += [tf.TensorSpec([plan.channels], d) for d in param_dtypes if d is not None]
    return tf.function(core, input_signature=signature, jit_compile=jit, autograph=False)  # type: ignore[no-any-return]


def _param(p: Any) -> tf.Tensor | None:
    if p is None:
        return None
    return tf.convert_to_tensor(p)


def execute(plan: Plan, x: Any, gamma: Any, beta: Any, activation: Activation) -> tf.Tensor:
    """Run a validated plan on a TensorFlow tensor; ``gamma``/``beta`` are ``[C]`` tensors or None."""
    x = tf.convert_to_tensor(x)
    g, b = _param(gamma), _param(beta)
    fused = activation if isinstance(activation, str) else None
    fn = _function(plan, fused, (None if g is None else g.dtype, None if b is None else b.dtype), JIT_COMPILE)
    y = fn(x, *(p for p in (g, b) if p is not None))
    y.set_shape(x.shape)
    return activation(y) if callable(activation) else y
