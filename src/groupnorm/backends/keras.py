"""Keras 3 backend: executes a plan on every Keras backend.

On the TensorFlow Keras backend, :func:`execute` hands tensors to :mod:`groupnorm.backends.tensorflow`
(XLA-compiled, with a hand-written gradient) and on the JAX Keras backend to
:mod:`groupnorm.backends.jax` (jit-compiled, with a hand-written derivative), unless ``portable=True``;
on PyTorch and others the plan runs as ``keras.ops``, differentiated by the backend's autodiff. Every
path follows :mod:`groupnorm._numerics`: statistics in float32 (float64 for float64 input), each group
shifted by the mean of its corner, one pass for the sums, the rare groups that need it (values too
large or too small to square anywhere in the group, a corner unlike its group, NaN or Inf) recomputed
in exact power-of-two units under ``keras.ops.cond``, the output formed as ``(x * u - K) * scale +
offset``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from groupnorm import _numerics as N
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


class _Ops:
    """:class:`groupnorm._numerics.Ops` with ``keras.ops`` (the conditional is ``keras.ops.cond``)."""

    def __init__(self, work: str) -> None:
        self.work = work
        self.lim = N.limits(work)
        self.bits = "int64" if work == "float64" else "int32"

    def _like(self, value: Any, other: Any) -> Any:
        if isinstance(value, int | float):
            return ops.cast(value, other.dtype if hasattr(other, "dtype") else self.work)
        return value

    def where(self, condition: Any, a: Any, b: Any) -> Any:
        return ops.where(condition, self._like(a, b), self._like(b, a))

    def maximum(self, a: Any, b: Any) -> Any:
        return ops.maximum(a, self._like(b, a))

    def rsqrt(self, a: Any) -> Any:
        return ops.rsqrt(a)

    def exp(self, a: Any) -> Any:
        return ops.exp(a)

    def erf(self, a: Any) -> Any:
        return ops.erf(a)

    def exponent(self, a: Any) -> Any:
        lim = self.lim
        field = ops.right_shift(ops.view(a, self.bits), lim.mantissa_bits)
        return ops.bitwise_and(field, 2 * lim.exponent_bias + 1) - (lim.exponent_bias - 1)

    def power_of_two(self, e: Any) -> Any:
        lim = self.lim
        return ops.view(ops.left_shift(ops.cast(e, self.bits) + lim.exponent_bias, lim.mantissa_bits), self.work)

    def all(self, flags: Any) -> Any:
        return ops.all(flags)

    def cond(self, predicate: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
        return ops.cond(predicate, true_fn, false_fn)


def _sum(t: Any, axes: tuple[int, ...]) -> Any:
    return ops.sum(t, axis=axes, keepdims=True)


class _Passes:
    """:class:`groupnorm._numerics.Passes` with ``keras.ops``: sums in the plan's statistics view, the
    corner in its split view. Shift and unit enter every sum as constants (``stop_gradient``), so that
    autodiff gives the sums of ``x * u - K`` the derivatives of the mean and the variance."""

    def __init__(self, plan: Plan, x: Any, work: str) -> None:
        self.plan, self.work = plan, work
        dims = list(ops.shape(x))
        self.v = ops.cast(ops.reshape(x, plan.view_shape(dims)), work)
        self.xs = ops.reshape(x, plan.split_shape(dims))
        self.axes = plan.view_reduce_axes
        self.stats_shape = plan.stats_shape(dims)
        self.group_shape = [1 if a in self.axes else d for a, d in enumerate(plan.view_shape(dims))]

    def split(self, per_group: Any) -> Any:
        return ops.reshape(per_group, self.stats_shape)

    def corner_shift(self, unit: Any) -> Any:
        plan = self.plan
        within = plan.channels_axis + 1
        reduced = [a for a in plan.split_reduce_axes if a != within]
        static = plan.split_shape(plan.shape)
        spot = N.corner([int(static[a]) for a in reduced])  # type: ignore[arg-type]  # reduced dims are static
        rank = len(static)
        box_index = [slice(None)] * rank
        first_index = [slice(None)] * rank
        for a, b in zip(reduced, spot.box, strict=True):
            box_index[a] = slice(0, b)
            first_index[a] = slice(0, 1)
        first_index[within] = slice(0, 1)
        box = ops.cast(self.xs[tuple(box_index)], self.work)
        first = box[tuple(first_index)]
        if unit is not None:
            u = self.split(unit)
            box, first = box * u, first * u
        diff = box - first
        if not spot.exact:
            mask_shape = [1] * rank
            for a, b in zip(reduced, spot.box, strict=True):
                mask_shape[a] = b
            mask = ops.reshape(ops.arange(math.prod(spot.box)) < spot.size, mask_shape)
            diff = ops.where(mask, diff, ops.zeros((), self.work))
        total = ops.sum(diff, axis=plan.split_reduce_axes, keepdims=True)
        shift = N.shift_from_corner(first, total, spot.size * plan.group_channels)
        return ops.stop_gradient(ops.reshape(shift, self.group_shape))

    def _shifted(self, shift: Any, unit: Any) -> Any:
        d = self.v if unit is None else self.v * ops.stop_gradient(unit)
        return d if shift is None else d - ops.stop_gradient(shift)

    def sums(self, shift: Any, unit: Any) -> tuple[Any, Any]:
        d = self._shifted(shift, unit)
        return _sum(d, self.axes), _sum(ops.square(d), self.axes)

    def centre(self, shift: Any, unit: Any) -> Any:
        return _sum(self._shifted(shift, unit), self.axes)

    def max_abs(self) -> Any:
        return ops.stop_gradient(ops.max(ops.abs(self.v), axis=self.axes, keepdims=True))


def execute(plan: Plan, x: Any, gamma: Any, beta: Any, activation: Activation, *, portable: bool = False) -> Any:
    """Run a validated plan on a tensor of the current Keras backend; ``gamma``/``beta`` are ``[C]``
    tensors or variables, or None. ``portable=True`` uses ``keras.ops`` even on TensorFlow and JAX."""
    backend = keras.backend.backend()
    if not portable and backend == "tensorflow":
        from groupnorm.backends import tensorflow as tf_backend

        return tf_backend.execute(plan, x, gamma, beta, activation)
    if not portable and backend == "jax":
        from groupnorm.backends import jax as jax_backend

        def value(p: Any) -> Any:
            return None if p is None else ops.convert_to_tensor(p)

        return jax_backend.execute(plan, ops.convert_to_tensor(x), value(gamma), value(beta), activation)

    work = "float64" if plan.dtype == "float64" else "float32"
    o = _Ops(work)
    passes = _Passes(plan, x, work)
    stats = N.statistics(passes, plan.group_size, plan.epsilon, not plan.mean_close_to_zero, o.lim, o)
    shift, unit, mean, var = (passes.split(s) for s in stats)
    shift, unit = ops.stop_gradient(shift), ops.stop_gradient(unit)
    rstd_u, _ = N.normalizer(N.Stats(shift, unit, mean, var), plan.epsilon, o.lim, o)
    g = None if gamma is None else ops.reshape(ops.cast(gamma, work), plan.param_shape)
    b = None if beta is None else ops.reshape(ops.cast(beta, work), plan.param_shape)
    scale, offset = N.output_coefficients(mean, rstd_u, g, b)
    centered = ops.cast(passes.xs, work) * unit - shift
    y = N.activate(activation if isinstance(activation, str) else None, centered * scale + offset, o)
    out = ops.cast(ops.reshape(y, list(ops.shape(x))), x.dtype)
    return activation(out) if callable(activation) else out
