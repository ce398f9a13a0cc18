"""TensorFlow backend: executes a plan on ``tf.Tensor`` / ``tf.Variable`` inputs.

Works eagerly, inside ``tf.function`` (dynamic batch dimensions included, without retracing per batch
size), under ``jit_compile=True``, in ``tf.compat.v1`` graphs and in SavedModels. Statistics accumulate in
float32 for float16/bfloat16/float32 input and in float64 for float64 input.

The computation is one small function per (plan, activation, parameter dtypes), compiled with XLA by
default (:data:`JIT_COMPILE`), with a hand-written gradient, and it follows :mod:`groupnorm._numerics`:

* statistics: each group's shift ``K`` is the mean of its corner (a few elements); one reduction pass
  gives the sum and the sum of squares of ``x - K``; groups whose statistics fail the checks (values
  too large or too small to square, anywhere in the group; a corner unlike its group; NaN or Inf) are
  recomputed in exact power-of-two units inside a ``tf.cond`` that runs only when some group needs it,
  and selected group by group, so the rescue works in graphs and under XLA alike.
* output: one fused elementwise pass, ``(x * u - K) * scale + offset`` with per-channel ``scale`` and
  ``offset``, then the fused activation.
* gradient: two reductions per (kept index, channel) -- of ``g`` and of ``g * xhat`` -- give the
  gradients of ``beta`` and ``gamma`` and the two group means the input gradient needs, which is then one
  fused elementwise pass, ``r * (gamma * g - m1 - xhat * m2)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import tensorflow as tf

from groupnorm import _numerics as N
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


class _Ops:
    """:class:`groupnorm._numerics.Ops` for TensorFlow (graph-safe: the conditional is ``tf.cond``)."""

    def __init__(self, work: tf.DType) -> None:
        self.work = work
        self.lim = N.limits(work.name)
        self.uint = tf.int64 if work == tf.float64 else tf.int32

    @staticmethod
    def _like(value: Any, other: Any) -> Any:
        return tf.cast(value, other.dtype) if isinstance(value, int | float) and isinstance(other, tf.Tensor) else value

    def where(self, condition: Any, a: Any, b: Any) -> Any:
        a, b = self._like(a, b), self._like(b, a)
        if isinstance(a, int | float) and isinstance(b, int | float):
            a, b = tf.constant(a, self.work), tf.constant(b, self.work)
        return tf.where(condition, a, b)

    def maximum(self, a: Any, b: Any) -> Any:
        return tf.maximum(a, self._like(b, a))

    def rsqrt(self, a: Any) -> Any:
        return tf.math.rsqrt(a)

    def exp(self, a: Any) -> Any:
        return tf.exp(a)

    def erf(self, a: Any) -> Any:
        return tf.math.erf(a)

    def exponent(self, a: Any) -> Any:
        lim = self.lim
        field = tf.bitwise.right_shift(tf.bitcast(a, self.uint), lim.mantissa_bits)
        return tf.bitwise.bitwise_and(field, 2 * lim.exponent_bias + 1) - (lim.exponent_bias - 1)

    def power_of_two(self, e: Any) -> Any:
        lim = self.lim
        biased = tf.cast(e, self.uint) + lim.exponent_bias
        return tf.bitcast(tf.bitwise.left_shift(biased, lim.mantissa_bits), self.work)

    def all(self, flags: Any) -> Any:
        return tf.reduce_all(flags)

    def cond(self, predicate: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
        return tf.cond(predicate, true_fn, false_fn)


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


class _Passes:
    """:class:`groupnorm._numerics.Passes` over one input: sums in the plan's statistics view, the
    corner in its split view; per-group values in the statistics view's keepdims shape."""

    def __init__(self, plan: Plan, x: tf.Tensor, work: tf.DType, staged: bool) -> None:
        self.plan, self.work, self.staged = plan, work, staged
        dims = _dims(x)
        self.v = tf.cast(tf.reshape(x, plan.view_shape(dims)), work)
        self.xs = tf.reshape(x, plan.split_shape(dims))
        self.split_dims = plan.split_shape(dims)
        self.axes = plan.view_reduce_axes
        self.stats_shape = plan.stats_shape(dims)
        view = plan.view_shape(dims)
        self.group_shape = [1 if a in self.axes else d for a, d in enumerate(view)]

    def split(self, per_group: tf.Tensor) -> tf.Tensor:
        """Per-group values shaped to broadcast against the split view."""
        return tf.reshape(per_group, self.stats_shape)

    def corner_shift(self, unit: tf.Tensor | None) -> tf.Tensor:
        plan, xs = self.plan, tf.reshape(self.v, self.split_dims)
        within = plan.channels_axis + 1
        reduced = [a for a in plan.split_reduce_axes if a != within]
        rank = len(plan.split_shape(plan.shape))
        static = plan.split_shape(plan.shape)
        spot = N.corner([int(static[a]) for a in reduced])  # type: ignore[arg-type]  # reduced dims are static
        box_index = [slice(None)] * rank
        first_index = [slice(None)] * rank
        for a, b in zip(reduced, spot.box, strict=True):
            box_index[a] = slice(0, b)
            first_index[a] = slice(0, 1)
        first_index[within] = slice(0, 1)
        box = tf.cast(xs[tuple(box_index)], self.work)
        first = box[tuple(first_index)]
        if unit is not None:
            u = self.split(unit)
            box, first = box * u, first * u
        diff = box - first
        if not spot.exact:
            mask_shape = [1] * rank
            for a, b in zip(reduced, spot.box, strict=True):
                mask_shape[a] = b
            mask = tf.reshape(tf.range(math.prod(spot.box)) < spot.size, mask_shape)
            diff = tf.where(mask, diff, tf.zeros((), self.work))
        total = tf.reduce_sum(diff, axis=plan.split_reduce_axes, keepdims=True)
        shift = N.shift_from_corner(first, total, spot.size * plan.group_channels)
        return tf.reshape(shift, self.group_shape)

    def _shifted(self, shift: tf.Tensor | None, unit: tf.Tensor | None) -> tf.Tensor:
        d = self.v if unit is None else self.v * unit
        return d if shift is None else d - shift

    def sums(self, shift: tf.Tensor | None, unit: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor]:
        d = self._shifted(shift, unit)
        s1, s2 = _reduce_sums([d, tf.square(d)], self.axes, self.staged)
        return s1, s2

    def centre(self, shift: tf.Tensor, unit: tf.Tensor) -> tf.Tensor:
        return _reduce_sums([self._shifted(shift, unit)], self.axes, self.staged)[0]

    def max_abs(self) -> tf.Tensor:
        return tf.reduce_max(tf.abs(self.v), axis=self.axes, keepdims=True)


def _statistics(plan: Plan, x: tf.Tensor, staged: bool) -> tuple[_Passes, N.Stats]:
    """The passes over ``x`` and its statistics. Their gradient is written by hand (the mean's is the
    mean of ``u * dx``, the variance's ``2 * mean((x * u - K - mean) * u * dx)``; shift and unit are
    constants), so that second-order gradients never differentiate the rescue's ``tf.cond`` (which XLA
    cannot) and need no pass over the rescue; derivatives beyond the second treat the statistics inside
    this gradient as constants."""
    work = _work_dtype(x.dtype)
    passes = _Passes(plan, x, work, staged)
    ops = _Ops(work)
    n = float(max(plan.group_size, 1))
    # the statistics as stats_of returns them: its gradient reads them from here, not from inside the
    # tf.cond (a gradient graph that captures a tf.cond's outputs makes TensorFlow differentiate the
    # tf.cond for the next order, which XLA cannot compile)
    returned: list[N.Stats] = []

    @tf.custom_gradient  # type: ignore[untyped-decorator]
    def stats_of(v: tf.Tensor) -> tuple[tuple[tf.Tensor, ...], Callable[..., tf.Tensor]]:
        passes.v = v
        stats = N.statistics(passes, plan.group_size, plan.epsilon, not plan.mean_close_to_zero, ops.lim, ops)

        def grad(*upstream: tf.Tensor | None) -> tf.Tensor:
            _, _, dmean, dvar = upstream
            shift, unit, mean = (tf.stop_gradient(s) for s in returned[0][:3])
            total = tf.zeros_like(mean) if dmean is None else dmean
            coef = tf.zeros_like(mean) if dvar is None else 2.0 * dvar
            return (total + coef * (v * unit - shift - mean)) * (unit * (1.0 / n))

        return tuple(stats), grad

    v = passes.v
    stats = N.Stats(*stats_of(v))
    returned.append(stats)
    passes.v = v
    return passes, stats._replace(shift=tf.stop_gradient(stats.shift), unit=tf.stop_gradient(stats.unit))


def group_statistics(plan: Plan, x: Any) -> N.Stats:
    """The per-group statistics (:class:`groupnorm._numerics.Stats`) this backend computes for ``x``
    (eagerly; in the statistics view's keepdims shape), for tests and for comparing backends."""
    return _statistics(plan, tf.convert_to_tensor(x), staged=False)[1]


def _build(plan: Plan, activation: str | None, has_gamma: bool, has_beta: bool, jit: bool) -> Callable[..., tf.Tensor]:
    """The group normalization of ``plan`` as a function of ``(x, *params)`` with its gradient; ``jit``:
    formulated for XLA."""

    split_reduce = plan.split_reduce_axes
    c = plan.channels_axis
    # per (kept index, channel) sums: every reduced split axis except the within-group one
    coef_reduce = tuple(a for a in split_reduce if a != c + 1)
    # from coefficient shape to per-channel: every axis but the two channel axes
    channel_sum = tuple(a for a in range(plan.rank + 1) if a not in (c, c + 1))
    n = float(max(plan.group_size, 1))

    def split_params(params: Sequence[tf.Tensor], work: tf.DType) -> tuple[tf.Tensor | None, tf.Tensor | None]:
        it = iter(params)
        gamma = tf.reshape(tf.cast(next(it), work), plan.param_shape) if has_gamma else None
        beta = tf.reshape(tf.cast(next(it), work), plan.param_shape) if has_beta else None
        return gamma, beta

    def forward(x: tf.Tensor, *params: tf.Tensor) -> tuple[tf.Tensor, Callable[..., Any]]:
        work = _work_dtype(x.dtype)
        ops = _Ops(work)
        dims = _dims(x)
        passes, stats = _statistics(plan, x, jit)
        shift, unit, mean, var = (passes.split(s) for s in stats)
        rstd_u, r = N.normalizer(N.Stats(shift, unit, mean, var), plan.epsilon, ops.lim, ops)
        gamma, beta = split_params(params, work)
        scale, offset = N.output_coefficients(mean, rstd_u, gamma, beta)
        # x * u - K: u is 1 but for rescued groups (exact either way)
        centered = tf.cast(passes.xs, work) * unit - shift
        y = tf.reshape(tf.cast(N.activate(activation, centered * scale + offset, ops), x.dtype), dims)

        def grad(dy: tf.Tensor) -> tuple[tf.Tensor, ...]:
            g = tf.cast(tf.reshape(dy, plan.split_shape(dims)), work)
            xhat = (centered - mean) * rstd_u
            if activation is not None:
                g = g * N.activation_grad(activation, centered * scale + offset, ops)
            # per (kept index, channel): sums of g and of g * xhat
            a, b = _reduce_sums([g, g * xhat], coef_reduce, jit)
            ga = a if gamma is None else a * gamma
            gb = b if gamma is None else b * gamma
            m1 = tf.reduce_sum(ga, axis=c + 1, keepdims=True) * (1.0 / n)
            m2 = tf.reduce_sum(gb, axis=c + 1, keepdims=True) * (1.0 / n)
            if jit:
                # dx = r * (gamma * g - m1 - xhat * m2) as one fused pass over g and x * u - K, with
                # per-group factors (all in range: see groupnorm._numerics, step 6)
                p = r if gamma is None else r * gamma
                t = r * m2
                dx = g * p - (centered * rstd_u) * t + ((mean * rstd_u) * t - r * m1)
            else:
                # TensorFlow's graph optimizer regroups chains of products by operand size (XLA does
                # not): here no small factor may multiply two others
                dx = N.input_gradient(g if gamma is None else g * gamma, xhat, m1, m2, r)
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
