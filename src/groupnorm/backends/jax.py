"""JAX backend: executes a plan on ``jax.Array`` values (concrete arrays or tracers).

Everything here is a pure function of its inputs built from ``jax.numpy`` and ``jax.lax``, so it works
under ``jax.jit``, ``jax.grad`` (and forward mode, and higher orders), ``jax.vmap`` and
``jax.checkpoint``. Statistics accumulate in float32 for float16/bfloat16/float32 input (float64 for
float64 input); the output has the input's dtype.

The numerics are :mod:`groupnorm._numerics`'s: each group is shifted by the mean ``K`` of its corner (a
few elements), one pass gives the sum and the sum of squares of ``x - K``, and the output is formed as
``(x * u - K) * scale + offset``, exact to float32 rounding however large the mean is against the
spread. Groups whose statistics fail the checks (values too large or too small to square anywhere in
the group, a corner unlike its group, NaN or Inf) are recomputed in exact power-of-two units ``u`` inside
a ``jax.lax.cond`` that runs only when some group needs it (also under ``vmap``: its predicate is taken
over the whole batch), and selected group by group.

The input is seen in the channel view of :mod:`groupnorm.backends._layout` (NHWC as ``(N, H*W, C)``):
each statistic is a per-channel reduction over whole axes, summed over a group's channels afterwards,
which XLA's CPU code generator compiles into fast loops.

Statistics across devices: with ``axis_name`` (inside ``shard_map`` or ``pmap``) each device's input is
one shard of the groups' elements. The shift is then the mean of the shards' corner shifts (``psum``),
the same on every device, and every sum and maximum is taken over devices too, so the result and its
gradients are those of the unsharded input, with the same stability.

The statistics carry a hand-written forward-mode derivative (``jax.custom_jvp``): the mean's tangent is
``u * mean(dx)`` and the variance's ``2 * u * mean((x * u - K - mean) * dx)``. JAX transposes it for
reverse mode, so a backward pass reads the input and the output's cotangent once for the per-channel
sums and once more to form the input's gradient, without differentiating through the shift or the rescue.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable, Hashable, Sequence
from functools import lru_cache, partial
from typing import Any, cast

import jax
import jax.numpy as jnp

from groupnorm import _numerics as N
from groupnorm._api import Backend, plan_for
from groupnorm._plan import Activation, Plan, resolve_activation
from groupnorm.backends._layout import ChannelView, channel_view

NAME = "jax"

__all__ = ["execute", "group_norm"]


def is_array(x: object) -> bool:
    """True for ``jax.Array`` values, including tracers under ``jit``/``grad``/``vmap``."""
    return isinstance(x, jax.Array)


def static_shape(x: Any) -> tuple[int | None, ...]:
    """The static shape; symbolic dimensions (``jax.export``) read as unknown (``None``)."""
    return tuple(d if isinstance(d, int) else None for d in x.shape)


def dtype_name(x: Any) -> str:
    return str(jnp.dtype(x.dtype).name)


def _work_dtype(dtype: Any) -> Any:
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


@jax.custom_batching.custom_vmap
def _all(flags: jax.Array) -> jax.Array:
    """``jnp.all(flags)``, also over a ``vmap``'s batch axis: a ``lax.cond`` on it stays a branch under
    ``vmap`` (where a per-example predicate would run both branches for every example)."""
    return jnp.all(flags)


@_all.def_vmap
def _all_vmap(axis_size: int, in_batched: list[bool], flags: jax.Array) -> tuple[jax.Array, bool]:
    return _all(flags), False


class _Ops:
    """:class:`groupnorm._numerics.Ops` for JAX (the conditional is ``jax.lax.cond``)."""

    def __init__(self, work: Any) -> None:
        self.work = work

    def where(self, condition: Any, a: Any, b: Any) -> Any:
        return jnp.where(condition, a, b)

    def maximum(self, a: Any, b: Any) -> Any:
        return jnp.maximum(a, b)

    def rsqrt(self, a: Any) -> Any:
        return jax.lax.rsqrt(a)

    def exp(self, a: Any) -> Any:
        return jnp.exp(a)

    def erf(self, a: Any) -> Any:
        return jax.scipy.special.erf(a)

    def exponent(self, a: Any) -> Any:
        return jnp.frexp(a)[1]

    def power_of_two(self, e: Any) -> Any:
        return jnp.ldexp(jnp.ones(jnp.shape(e), self.work), e)

    def all(self, flags: Any) -> Any:
        return _all(flags)

    def cond(self, predicate: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
        return jax.lax.cond(predicate, lambda _: true_fn(), lambda _: false_fn(), None)


def _psum(value: jax.Array, axis_name: Any, axis_index_groups: Any) -> jax.Array:
    return cast(jax.Array, jax.lax.psum(value, axis_name, axis_index_groups=axis_index_groups))  # type: ignore[no-untyped-call]


def _pmax(value: jax.Array, axis_name: Any, axis_index_groups: Any) -> jax.Array:
    return cast(jax.Array, jax.lax.pmax(value, axis_name, axis_index_groups=axis_index_groups))  # type: ignore[no-untyped-call]


#: inputs of at most this many elements, in groups of at most DIRECT_MAX_GROUP, reduce each group in
#: one reduction over its channels and positions (fewer, larger XLA operations: what small inputs are
#: bound by); others reduce per channel first and sum a group's channels afterwards (what XLA's CPU
#: loops do fastest on large inputs, and more accurate for large groups: shorter float32 sums)
DIRECT_MAX_SIZE = 2**18
DIRECT_MAX_GROUP = 4096


def _direct(plan: Plan, view: ChannelView, xv: jax.Array) -> bool:
    size = 1
    for d in xv.shape:
        if not isinstance(d, int):
            return False
        size *= d
    return size <= DIRECT_MAX_SIZE and plan.group_size <= DIRECT_MAX_GROUP and view.group_channels > 1


class _Passes:
    """:class:`groupnorm._numerics.Passes` over the input in the channel view (in the work dtype), with
    an optional device axis; per-group values in the view's per-group shape. Elementwise work runs on
    the channel view, or, for small inputs, on the view with its channel axis split into (groups,
    channels of a group) (:data:`DIRECT_MAX_SIZE`)."""

    def __init__(self, plan: Plan, xv: jax.Array, axis_name: Hashable, axis_index_groups: Hashable) -> None:
        self.plan = plan
        self.view = view = channel_view(plan)
        self.direct = _direct(plan, view, xv)
        c = view.channel
        if self.direct:
            self.xv = xv.reshape(view.split(xv.shape))
            self.axes = (*(a if a < c else a + 1 for a in view.reduced), c + 1)
        else:
            self.xv, self.axes = xv, view.reduced
        self.axis_name = axis_name
        self.groups_arg = None if axis_index_groups is None else [list(i) for i in axis_index_groups]  # type: ignore[attr-defined]
        kept = [a for a in range(self.xv.ndim) if a not in self.axes and a != c]
        #: every kept axis (the batch, for NHWC) has one entry: see :func:`_one_row_affine`
        self.one_row = all(isinstance(d, int) for d in self.xv.shape) and all(self.xv.shape[a] == 1 for a in kept)

    def total(self, value: jax.Array) -> jax.Array:
        return value if self.axis_name is None else _psum(value, self.axis_name, self.groups_arg)

    def count(self) -> jax.Array:
        return self.total(jnp.asarray(self.plan.group_size, self.xv.dtype))

    def channels(self, per_group: jax.Array) -> jax.Array:
        """Per-group values shaped to broadcast against this pass's view of the input."""
        if per_group.ndim == 0:
            return per_group
        if self.direct:
            return jnp.expand_dims(per_group, self.view.channel + 1)
        return to_channels(per_group, self.plan)

    def params(self, p: jax.Array) -> jax.Array:
        """A ``[C]`` parameter shaped to broadcast against this pass's view."""
        shape = self.view.param_shape()
        return p.reshape(self.view.split(shape) if self.direct else shape)

    def reduce(self, t: jax.Array, how: Callable[..., jax.Array] = jnp.sum) -> jax.Array:
        """``t`` (of this pass's view) reduced over each group: per-group values."""
        if self.direct:
            return jnp.squeeze(how(t, axis=self.axes, keepdims=True), self.view.channel + 1)
        per_channel = how(t, axis=self.axes, keepdims=True)
        return how(per_channel.reshape(self.view.split(per_channel.shape)), axis=self.view.channel + 1)

    def _sum(self, t: jax.Array) -> jax.Array:
        return self.total(self.reduce(t))

    def corner_shift(self, unit: jax.Array | None) -> jax.Array:
        """The corner's few positions are sliced one by one and added elementwise (one small fused loop),
        then summed over each group's channels: a reduction over the sliced box instead would be an XLA
        operation of its own, which costs more than the rest of the statistics on a small input."""
        view = self.view
        c = view.channel
        dims = self.xv.shape
        if self.direct:  # the channel view's shape
            dims = (*dims[:c], dims[c] * dims[c + 1], *dims[c + 2 :])
            reduced = [a if a < c else a + 1 for a in view.reduced]
        else:
            reduced = list(view.reduced)
        spot = view.corner(dims)
        first_index = list(view.first_index())
        if self.direct:  # every group's first channel on the split channel axis
            first_index[c] = slice(None)
            first_index.insert(c + 1, slice(0, 1))
        first = self.xv[tuple(first_index)]
        scale = None if unit is None else self.channels(unit)
        if unit is not None:
            first = first * (self.channels(unit) if self.direct else unit)
        first_wide = first if self.direct else self.channels(first)
        positions = itertools.islice(itertools.product(*(range(b) for b in spot.box)), spot.size)
        total = jnp.zeros_like(first_wide)
        for position in positions:
            index = [slice(None)] * self.xv.ndim
            for a, p in zip(reduced, position, strict=True):
                index[a] = slice(p, p + 1)
            term = self.xv[tuple(index)]
            total = total + ((term if scale is None else term * scale) - first_wide)
        first_group = jnp.squeeze(first, c + 1) if self.direct else first
        shift = N.shift_from_corner(first_group, self.reduce(total), spot.size * view.group_channels)
        if self.axis_name is not None:  # the same shift on every device: the mean of the shards' shifts
            shift = self.total(shift) / self.total(jnp.ones((), shift.dtype))
        return shift  # type: ignore[no-any-return]

    def sums(self, shift: jax.Array | None, unit: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """The two spell ``x * u - K`` differently (``x * u + (-K)`` and ``K - x * u``, equal in floating
        point up to sign) on purpose: XLA would otherwise share one ``x * u - K`` between both reductions
        and write it to memory, instead of fusing it into each of them."""
        xu = self.xv if unit is None else self.xv * self.channels(unit)
        if shift is None:
            return self._sum(xu), self._sum(jnp.square(xu))
        sc = self.channels(shift)
        return self._sum(xu + (-sc)), self._sum(jnp.square(sc - xu))

    def centre(self, shift: jax.Array, unit: jax.Array) -> jax.Array:
        return self._sum(self.xv * self.channels(unit) - self.channels(shift))

    def max_abs(self) -> jax.Array:
        biggest = self.reduce(jnp.abs(self.xv), jnp.max)
        if self.axis_name is not None:
            biggest = _pmax(biggest, self.axis_name, self.groups_arg)
        return biggest


@lru_cache(maxsize=256)
def _stats_fn(plan: Plan, axis_name: Hashable, axis_index_groups: Hashable) -> Callable[[jax.Array], N.Stats]:
    """For a plan (and an optional device axis), a function from the input in the channel view (in the
    work dtype) to its per-group :class:`groupnorm._numerics.Stats`, with a hand-written JVP."""
    lim = N.limits(plan.dtype)
    shifted = not plan.mean_close_to_zero

    def compute(xv: jax.Array) -> N.Stats:
        passes = _Passes(plan, xv, axis_name, axis_index_groups)
        n = plan.group_size if axis_name is None else passes.count()  # over every device's shard
        return N.statistics(passes, n, plan.epsilon, shifted, lim, _Ops(xv.dtype))

    @jax.custom_jvp
    def stats(xv: jax.Array) -> N.Stats:
        return compute(xv)

    @stats.defjvp
    def stats_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[N.Stats, N.Stats]:
        (xv,), (dx,) = primals, tangents
        result = stats(xv)
        shift, unit, mean, _ = result
        passes = _Passes(plan, xv, axis_name, axis_index_groups)
        n = passes.count()
        if passes.direct:
            dx = dx.reshape(passes.xv.shape)
        dmean = passes.total(passes.reduce(dx)) * (unit / n)
        # in units: x * u - K - mean is in range where its square may not be
        centered = (passes.xv * passes.channels(unit) - passes.channels(shift)) - passes.channels(mean)
        dvar = passes.total(passes.reduce(centered * dx)) * (2 * unit / n)
        return result, N.Stats(jnp.zeros_like(shift), jnp.zeros_like(unit), dmean, dvar)

    return cast(Callable[[jax.Array], N.Stats], stats)


def group_statistics(plan: Plan, x: Any) -> N.Stats:
    """The per-group statistics (:class:`groupnorm._numerics.Stats`) this backend computes for ``x``, in
    the channel view's per-group shape (for tests and for comparing backends)."""
    x = jnp.asarray(x)
    xv = x.reshape(channel_view(plan).shape(x.shape)).astype(_work_dtype(x.dtype))
    return N.Stats(*_stats_fn(plan, None, None)(xv))


def _clear_last_bit(values: jax.Array) -> jax.Array:
    """``values`` with the lowest mantissa bit cleared: within one unit in the last place, and the
    difference is exact in floating point."""
    uint = jnp.uint64 if values.dtype == jnp.float64 else jnp.uint32
    bits = jax.lax.bitcast_convert_type(values, uint)
    return jax.lax.bitcast_convert_type(bits & ~jnp.asarray(1, uint), values.dtype)


def to_channels(per_group: jax.Array, plan: Plan) -> jax.Array:
    """Per-group values (groups on the channel view's channel axis) repeated for each channel."""
    if per_group.ndim == 0:
        return per_group
    c = channel_view(plan).channel
    s = per_group.shape
    wide = jnp.broadcast_to(jnp.expand_dims(per_group, c + 1), (*s[: c + 1], plan.group_channels, *s[c + 1 :]))
    return wide.reshape((*s[:c], plan.channels, *s[c + 1 :]))


def _one_row_affine(t: jax.Array, scale: jax.Array, offset: jax.Array, reduced: Sequence[int]) -> jax.Array:
    """``t * scale + offset`` for an input of one row (every kept axis of extent 1), with one reduced axis
    split in two and ``scale``, ``offset`` repeated along the first part, so that the gradient of ``scale``
    is a reduction with a kept axis of more than one entry.

    Without one, XLA's CPU compiler (its YNNPACK fusions) turns the reduction of ``dy * t`` over the
    positions into a matrix product over the channels, channels x channels where only its diagonal is
    wanted: at (1, 64, 64, 512) NHWC that one pass took 40 ms instead of 0.5 ms."""
    for axis in reduced:
        extent = t.shape[axis]
        parts = next((k for k in range(2, math.isqrt(extent) + 1) if extent % k == 0), None)
        if parts is None:
            continue
        split = (*t.shape[:axis], parts, extent // parts, *t.shape[axis + 1 :])

        def repeated(p: jax.Array, axis: int = axis, parts: int = parts) -> jax.Array:
            if p.ndim != t.ndim:
                return p
            wide = jnp.expand_dims(p, axis)  # (..., 1, 1, ...) at the split axis
            return jnp.broadcast_to(wide, (*wide.shape[:axis], parts, *wide.shape[axis + 1 :]))

        y = t.reshape(split) * repeated(scale) + repeated(offset)
        return y.reshape(t.shape)
    return t * scale + offset


def _hashable_groups(axis_index_groups: Any) -> tuple[tuple[int, ...], ...] | None:
    if axis_index_groups is None:
        return None
    return tuple(tuple(int(i) for i in g) for g in axis_index_groups)


def execute(
    plan: Plan,
    x: jax.Array,
    gamma: Any,
    beta: Any,
    activation: Activation,
    *,
    axis_name: Hashable = None,
    axis_index_groups: Any = None,
) -> jax.Array:
    """Run a validated plan on a JAX array; ``gamma``/``beta`` are ``[C]`` array-likes or None.

    ``axis_name`` (and ``axis_index_groups``, as ``jax.lax.psum`` takes them) makes the statistics run
    over that mapped axis too, for input sharded over devices inside ``shard_map`` or ``pmap``.
    """
    x = jnp.asarray(x)
    if x.size == 0:
        return jnp.zeros_like(x)
    fused = activation if isinstance(activation, str) else None
    gamma = None if gamma is None else jnp.asarray(gamma)
    beta = None if beta is None else jnp.asarray(beta)
    out = _run(x, gamma, beta, plan, fused, axis_name, _hashable_groups(axis_index_groups))
    return cast(jax.Array, activation(out)) if callable(activation) else out


@partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _run(
    x: jax.Array,
    gamma: jax.Array | None,
    beta: jax.Array | None,
    plan: Plan,
    activation: str | None,
    axis_name: Hashable,
    axis_index_groups: tuple[tuple[int, ...], ...] | None,
) -> jax.Array:
    """The computation, compiled once per plan in eager use and inlined into an enclosing ``jit``."""
    work = _work_dtype(x.dtype)
    ops = _Ops(work)
    dims = x.shape
    view = channel_view(plan)
    xv = x.reshape(view.shape(dims)).astype(work)
    shift, unit, mean, var = _stats_fn(plan, axis_name, axis_index_groups)(xv)
    rstd_u, _ = N.normalizer(N.Stats(shift, unit, mean, var), plan.epsilon, N.limits(plan.dtype), ops)
    passes = _Passes(plan, xv, axis_name, axis_index_groups)
    xv, expand = passes.xv, passes.channels
    g = None if gamma is None else passes.params(gamma.astype(work))
    b = None if beta is None else passes.params(beta.astype(work))
    # The output's own shift: the statistics' shift with its last mantissa bit cleared. The two differ
    # by an exactly representable amount, folded into the mean, so the result is the same; but being a
    # different value, XLA fuses each use of ``x * u - K`` into its own pass (forward statistics,
    # output, and under autodiff the backward reductions) instead of sharing one and writing it to memory.
    near = shift if plan.mean_close_to_zero else _clear_last_bit(shift)
    scale, offset = N.output_coefficients(expand((shift - near) + mean), expand(rstd_u), g, b)
    centered = xv * expand(unit) - expand(near)
    if passes.one_row:
        split_axes = [a for a in passes.axes if not (passes.direct and a == view.channel + 1)]
        affine = _one_row_affine(centered, scale, offset, split_axes)
    else:
        affine = centered * scale + offset
    y = N.activate(activation, affine, ops)
    return cast(jax.Array, y.astype(x.dtype).reshape(dims))


def group_norm(
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
    axis_name: Hashable = None,
    axis_index_groups: Any = None,
) -> jax.Array:
    """:func:`groupnorm.group_norm` for JAX arrays, plus statistics across devices.

    ``axis_name`` names a mapped axis (of ``shard_map`` or ``pmap``) over which the input's groups are
    sharded: mean and variance then run over every device's shard as well, so the output and gradients
    equal those of the unsharded input. ``axis_index_groups`` restricts that to subsets of devices, as
    in ``jax.lax.psum`` (``pmap`` only). Anything ``jnp.asarray`` takes is accepted as input.
    """
    x = jnp.asarray(inputs)
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
    return execute(plan, x, gamma, beta, activation, axis_name=axis_name, axis_index_groups=axis_index_groups)


_SELF = cast(Backend, sys.modules[__name__])
