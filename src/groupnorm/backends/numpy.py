"""NumPy backend: executes a plan, and is the plain transcription of :mod:`groupnorm._numerics`.

Statistics accumulate in float32 for float16/bfloat16/float32 input and in float64 for float64 input.
The default (stable) variance shifts each group by the mean ``K`` of its corner (a few elements), takes
the sums of ``x - K`` in one pass, rescues the rare groups that need it (values too large or too small
to square, a corner unlike its group, NaN or Inf) in exact power-of-two units, and forms the output as
``(x * u - K) * scale + offset``. The backward pass (:func:`vjp`) computes those statistics once and
derives the normalized input, the activation's derivative and every gradient from them.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import numpy as np
from numpy.typing import NDArray

from groupnorm import _numerics as N
from groupnorm._api import Backend, plan_for
from groupnorm._plan import Activation, Plan, resolve_activation
from groupnorm.backends._layout import ChannelView, channel_view

NAME = "numpy"

__all__ = ["Gradients", "execute", "forward", "vjp"]

Array = NDArray[Any]


def _refuse(x: object) -> None:
    """``TypeError`` for the ndarray subclasses whose meaning group normalization would silently drop."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            "group_norm does not take a numpy.ma.MaskedArray: its mask would be ignored. Pass its data, "
            "numpy.ma.getdata(x), and the elements that count as mask=~numpy.ma.getmaskarray(x)."
        )
    if isinstance(x, np.matrix):
        raise TypeError(
            "group_norm does not take a numpy.matrix (always 2-D, with matrix semantics for *); pass numpy.asarray(x)."
        )


def is_array(x: object) -> bool:
    return isinstance(x, np.ndarray)


def static_shape(x: Array) -> tuple[int | None, ...]:
    _refuse(x)
    return tuple(x.shape)


def dtype_name(x: Array) -> str:
    return str(x.dtype.name)


def _erf(x: Array) -> Array:
    try:
        from scipy.special import erf
    except ImportError:  # pragma: no cover - scipy comes with the jax extra
        return np.vectorize(math.erf, otypes=[x.dtype])(x)  # type: ignore[no-any-return]
    return erf(x)  # type: ignore[no-any-return]


class _Ops:
    """:class:`groupnorm._numerics.Ops` for NumPy: the conditional is a plain ``if``."""

    def __init__(self, work: type[np.floating[Any]]) -> None:
        self.work = work

    def where(self, condition: Any, a: Any, b: Any) -> Any:
        return np.where(condition, a, b)

    def maximum(self, a: Any, b: Any) -> Any:
        return np.maximum(a, b)

    def rsqrt(self, a: Any) -> Any:
        return 1 / np.sqrt(a)

    def exp(self, a: Any) -> Any:
        return np.exp(a)

    def erf(self, a: Any) -> Any:
        return _erf(a)

    def exponent(self, a: Any) -> Any:
        return np.frexp(a)[1]

    def power_of_two(self, e: Any) -> Any:
        return np.ldexp(self.work(1), e)

    def all(self, flags: Any) -> bool:
        return bool(np.all(flags))

    def cond(self, predicate: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
        return true_fn() if predicate else false_fn()


_OPS = {np.float32: _Ops(np.float32), np.float64: _Ops(np.float64)}


def _work_dtype(dtype: np.dtype[Any]) -> type[np.floating[Any]]:
    return np.float64 if dtype == np.float64 else np.float32


class _Passes:
    """:class:`groupnorm._numerics.Passes` over one input in its channel view
    (:mod:`groupnorm.backends._layout`); per-group values in the view's per-group shape."""

    def __init__(self, plan: Plan, x: Array, work: type[np.floating[Any]]) -> None:
        self.view = channel_view(plan)
        self.work = work
        self.xv = x.reshape(self.view.shape(x.shape))
        self.axes = self.view.reduced

    def channels(self, per_group: Array) -> Array:
        """Per-group values repeated for each channel of the group."""
        return np.repeat(per_group, self.view.group_channels, axis=self.view.channel)

    def per_group(self, per_channel: Array) -> Array:
        """Per-channel values summed over each group's channels."""
        return per_channel.reshape(self.view.split(per_channel.shape)).sum(axis=self.view.channel + 1)  # type: ignore[no-any-return]

    def corner_shift(self, unit: Array | None) -> Array:
        view, shape = self.view, self.xv.shape
        box = self.xv[view.corner_index(shape)].astype(self.work)
        first = box[view.first_index()]
        if unit is not None:
            box, first = box * self.channels(unit), first * unit
        diff = box - self.channels(first)
        mask = view.corner_mask(shape)
        if mask is not None:
            diff = np.where(np.array(mask[1]).reshape(mask[0]), diff, 0)
        total = self.per_group(diff.sum(axis=self.axes, keepdims=True))
        return N.shift_from_corner(first, total, view.corner(shape).size * view.group_channels)  # type: ignore[no-any-return]

    def _shifted(self, shift: Array | None, unit: Array | None) -> Array:
        """A fresh array of ``x * unit - shift`` in the work dtype."""
        if unit is None:
            if shift is None:
                return self.xv.astype(self.work)
            return np.subtract(self.xv, self.channels(shift), dtype=self.work)
        d = np.multiply(self.xv, self.channels(unit), dtype=self.work)
        if shift is not None:
            d -= self.channels(shift)
        return d

    def _sum(self, t: Array) -> Array:
        return self.per_group(t.sum(axis=self.axes, keepdims=True))

    def sums(self, shift: Array | None, unit: Array | None) -> tuple[Array, Array]:
        d = self._shifted(shift, unit)
        s1 = self._sum(d)
        return s1, self._sum(np.square(d, out=d))

    def centre(self, shift: Array, unit: Array) -> Array:
        return self._sum(self._shifted(shift, unit))

    def max_abs(self) -> Array:
        per_channel = np.abs(self.xv).max(axis=self.axes, keepdims=True)
        return per_channel.reshape(self.view.split(per_channel.shape)).max(axis=self.view.channel + 1).astype(self.work)  # type: ignore[no-any-return]


class _Statistics(NamedTuple):
    """Per-(kept index, channel) statistics in the channel view (see :mod:`groupnorm._numerics`, steps
    3 and 4): each channel carries its group's values."""

    shift: Array
    unit: Array | None
    """``None`` where every group's unit is 1."""
    mean: Array
    rstd_u: Array
    r: Array


def _statistics(plan: Plan, passes: _Passes) -> _Statistics:
    work = passes.work
    ops, lim = _OPS[work], N.limits(plan.dtype)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        stats = N.statistics(passes, plan.group_size, plan.epsilon, not plan.mean_close_to_zero, lim, ops)
        shift, unit, mean, var = (passes.channels(np.asarray(s, work)) for s in stats)
        rstd_u, r = N.normalizer(N.Stats(shift, unit, mean, var), plan.epsilon, lim, ops)
    return _Statistics(shift, None if bool(np.all(unit == 1)) else unit, mean, rstd_u, r)


def group_statistics(plan: Plan, x: Array) -> N.Stats:
    """The per-group statistics (:class:`groupnorm._numerics.Stats`) this backend computes for ``x``,
    in the channel view's per-group shape (for tests and for comparing backends)."""
    passes = _Passes(plan, x, _work_dtype(x.dtype))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        stats = N.statistics(
            passes, plan.group_size, plan.epsilon, not plan.mean_close_to_zero, N.limits(plan.dtype), _OPS[passes.work]
        )
    return N.Stats(*(np.asarray(s, passes.work) for s in stats))


def _param(p: Any, view: ChannelView, work: type[np.floating[Any]]) -> Array | None:
    return None if p is None else np.asarray(p, dtype=work).reshape(view.param_shape())


def _shifted_input(plan: Plan, passes: _Passes, st: _Statistics) -> Array:
    """A fresh array of ``x * u - K`` in the channel view, in the work dtype."""
    xv, work = passes.xv, passes.work
    if st.unit is not None:
        d = np.multiply(xv, st.unit, dtype=work)
        d -= st.shift
        return d
    if plan.mean_close_to_zero and not np.any(st.shift):
        return xv.astype(work)
    return np.subtract(xv, st.shift, dtype=work)


def execute(plan: Plan, x: Array, gamma: Any, beta: Any, activation: Activation) -> Array:
    """Run a validated plan on a NumPy array; ``gamma``/``beta`` are ``[C]`` array-likes or None."""
    _refuse(x)
    if x.size == 0:
        return np.empty_like(x)
    work = _work_dtype(x.dtype)
    passes = _Passes(plan, x, work)
    st = _statistics(plan, passes)
    g, b = _param(gamma, passes.view, work), _param(beta, passes.view, work)
    with np.errstate(invalid="ignore", over="ignore"):
        scale, offset = N.output_coefficients(st.mean, st.rstd_u, g, b)
        y = _shifted_input(plan, passes, st)
        y *= scale
        y += offset
        if isinstance(activation, str):
            y = N.activate(activation, y, _OPS[work])
    out = y.reshape(x.shape).astype(x.dtype, copy=False)
    return activation(out) if callable(activation) else out


def _as_input(inputs: Any) -> Array:
    _refuse(inputs)
    return np.asarray(inputs)


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
    x = _as_input(inputs)
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
    The forward statistics are computed once; the normalized input, the activation's input and every
    gradient are formed from them (:mod:`groupnorm._numerics`, step 6).
    """
    x = _as_input(inputs)
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
    dy = _as_input(cotangent)
    if dy.shape != x.shape:
        raise ValueError(f"cotangent must have the input's shape {x.shape}, got {dy.shape}.")

    work = _work_dtype(x.dtype)
    view = channel_view(plan)
    g, b = _param(gamma, view, work), _param(beta, view, work)
    if x.size == 0:
        return Gradients(
            np.zeros_like(x),
            None if gamma is None else np.zeros(plan.channels, gamma.dtype),
            None if beta is None else np.zeros(plan.channels, beta.dtype),
        )
    ops = _OPS[work]
    passes = _Passes(plan, x, work)
    st = _statistics(plan, passes)
    axes = view.reduced
    kept = tuple(a for a in range(view.rank) if a not in axes and a != view.channel)
    with np.errstate(invalid="ignore", over="ignore"):
        xhat = _shifted_input(plan, passes, st)
        xhat -= st.mean
        xhat *= st.rstd_u
        grad = dy.reshape(passes.xv.shape).astype(work)
        if activation is not None:
            pre = xhat if g is None else xhat * g
            if b is not None:
                pre = pre + b
            grad *= N.activation_grad(activation, pre, ops)
        # per (kept index, channel) sums of g and g * xhat: dbeta and dgamma, and the group means
        sum_g = grad.sum(axis=axes, keepdims=True)
        sum_gx = np.multiply(grad, xhat).sum(axis=axes, keepdims=True)
        gs, gsx = (sum_g, sum_gx) if g is None else (sum_g * g, sum_gx * g)
        n = plan.group_size
        m1 = passes.channels(passes.per_group(gs) / n)
        m2 = passes.channels(passes.per_group(gsx) / n)
        # dx = r * (gamma * g - m1 - xhat * m2), in place
        if g is not None:
            grad *= g
        grad -= m1
        xhat *= m2
        grad -= xhat
        grad *= st.r
    dgamma = None if gamma is None else sum_gx.sum(axis=kept).reshape(-1).astype(gamma.dtype)
    dbeta = None if beta is None else sum_g.sum(axis=kept).reshape(-1).astype(beta.dtype)
    return Gradients(grad.reshape(x.shape).astype(x.dtype, copy=False), dgamma, dbeta)


_SELF = cast(Backend, sys.modules[__name__])
