"""JAX backend: executes a plan on ``jax.Array`` values (concrete arrays or tracers).

Everything here is a pure function of its inputs built from ``jax.numpy`` and ``jax.lax``, so it works
under ``jax.jit``, ``jax.grad`` (and forward mode, and higher orders), ``jax.vmap`` and
``jax.checkpoint``. Statistics accumulate in float32 for float16/bfloat16/float32 input (float64 for
float64 input); the output has the input's dtype.

Numerics, as in the NumPy reference: the default mode subtracts a per-group shift ``K`` close to the
group's mean, accumulates the sum and the sum of squares of ``x - K`` and forms the output as
``(x - K) * scale + offset``, which is exact to float32 rounding however large the mean is against the
spread. ``K`` is found cheaply: for large groups it is the mean of a 64th of the group; when that
turns out to be far from the group's mean (further than one standard deviation, which only unusual data
does) the sums are taken again around the mean just found, so accuracy never depends on the data's
layout. ``mean_close_to_zero=True`` takes one-pass sums of ``x`` itself, clamped at zero.

Spreads beyond the range of squares (about 1.8e19 in float32): the statistics carry the variance
scaled by a per-group power of two (exact), so the output and gradients, which are in range, never go
through the unscaled variance; where the sums of squares overflowed, they are taken again of ``x``
scaled by the group's largest ``|x|`` (only then: ordinary data pays nothing for it).

Statistics across devices: with ``axis_name`` (inside ``shard_map`` or ``pmap``) each device's input is
one shard of the groups' elements. The shift is then the mean over all shards (their sums and counts
added with ``psum``), the same on every device, and the shifted sums are added over devices too, so the
result and its gradients are those of the unsharded input, with the same stability.

The statistics carry a hand-written forward-mode derivative (``jax.custom_jvp``): the mean's tangent is
the mean of the input's tangent and the variance's is ``2 * mean((x - mean) * dx)``. JAX transposes it
for reverse mode, so a backward pass reads the input and the output's cotangent once for the per-channel
sums and once more to form the input's gradient, without differentiating through the shift.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial, reduce
from typing import Any, cast

import jax
import jax.numpy as jnp

from groupnorm._api import Backend, plan_for
from groupnorm._plan import Activation, Plan, resolve_activation

NAME = "jax"

__all__ = ["execute", "group_norm"]

#: groups at least this large take their shift from a sample of the group (see the module docstring).
SAMPLE_MIN_GROUP = 8192
#: the sample is the first 1/SAMPLE_FRACTION of the first reduced axis (of at least that many elements)
#: of the backend's view of the input (see ``_layout``).
SAMPLE_FRACTION = 64

Moments = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


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


@dataclass(frozen=True)
class _Layout:
    """How this backend views the input: neighbouring axes of the same kind (kept, reduced) merged, the
    channel axis alone. Reductions then run over whole axes with the channels innermost or outermost,
    which XLA compiles into fast per-channel reductions; the few channels of a group are summed after,
    on the small per-channel result."""

    runs: tuple[tuple[int, int], ...]
    """Runs ``(start, stop)`` of input axes merged into one axis of the view."""
    channel: int
    """The view axis of the channels."""
    reduced: tuple[int, ...]
    """The view axes statistics run over (besides the channels of a group)."""

    def shape(self, dims: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(reduce(operator.mul, dims[start:stop], 1) for start, stop in self.runs)


@lru_cache(maxsize=512)
def _layout(plan: Plan) -> _Layout:
    kinds = ["r" if a in plan.reduction_axes else "k" for a in range(plan.rank)]
    kinds[plan.channels_axis] = "c"
    runs: list[tuple[int, int]] = []
    for a, kind in enumerate(kinds):
        if runs and kind != "c" and kinds[runs[-1][0]] == kind:
            runs[-1] = (runs[-1][0], a + 1)
        else:
            runs.append((a, a + 1))
    channel = next(i for i, (start, _) in enumerate(runs) if kinds[start] == "c")
    reduced = tuple(i for i, (start, _) in enumerate(runs) if kinds[start] == "r")
    return _Layout(tuple(runs), channel, reduced)


def _sample_axis(plan: Plan, layout: _Layout, view: Sequence[Any]) -> int | None:
    """The view axis whose first 1/SAMPLE_FRACTION gives the shift, or None to use the whole group."""
    if plan.group_size < SAMPLE_MIN_GROUP:
        return None
    for a in layout.reduced:
        if isinstance(view[a], int) and view[a] >= SAMPLE_FRACTION:
            return a
    return None


def _psum(value: jax.Array, axis_name: Any, axis_index_groups: Any) -> jax.Array:
    return cast(jax.Array, jax.lax.psum(value, axis_name, axis_index_groups=axis_index_groups))  # type: ignore[no-untyped-call]


def _pmax(value: jax.Array, axis_name: Any, axis_index_groups: Any) -> jax.Array:
    return cast(jax.Array, jax.lax.pmax(value, axis_name, axis_index_groups=axis_index_groups))  # type: ignore[no-untyped-call]


@jax.custom_batching.custom_vmap
def _any(flags: jax.Array) -> jax.Array:
    """``jnp.any(flags)``, also over a ``vmap``'s batch axis: a ``lax.cond`` on it stays a branch under
    ``vmap`` (where a per-example predicate would run both branches for every example)."""
    return jnp.any(flags)


@_any.def_vmap
def _any_vmap(axis_size: int, in_batched: list[bool], flags: jax.Array) -> tuple[jax.Array, bool]:
    return _any(flags), False


def _unit(exponent: jax.Array, dtype: Any) -> jax.Array:
    """``2 ** -exponent`` in ``dtype``, exactly; ``exponent`` is clamped to where that is a normal number."""
    top = 1022 if jnp.dtype(dtype) == jnp.float64 else 126
    return jnp.ldexp(jnp.ones(exponent.shape, dtype), -jnp.clip(exponent, 0, top))


@lru_cache(maxsize=256)
def _moments_fn(plan: Plan, axis_name: Hashable, axis_index_groups: Hashable) -> Callable[[jax.Array], Moments]:
    """For a plan (and an optional device axis), a function from the input in :func:`_layout`'s view (in
    the work dtype) to per-group ``(shift, mean of x - shift, variance of (x - shift) * unit, unit)``:
    the view's shape with the reduced axes set to 1 and the channel axis to the number of groups.

    ``unit`` is a power of two, ``2 ** -e`` with ``e >= 0``, that brings the variance near 1 where it
    is larger (the variance itself is ``var * 4 ** e``, the reciprocal standard deviation
    ``rsqrt(var + eps * unit ** 2) * unit``). Where the spread is large, beyond ``1.8e19`` in float32,
    ``var * 4 ** e`` is beyond the dtype's range while the normalized output and its gradients are not:
    computed from the scaled variance they stay in range. Ordinary data takes the sums of ``x - shift``
    as they are (``e`` then follows from their variance, exactly); only where those sums overflowed
    (any group's variance not finite) are they taken again, of ``(x - shift) * unit`` with ``unit``
    from the group's largest ``|x|``."""
    layout = _layout(plan)
    axes, c, g = layout.reduced, layout.channel, plan.groups
    groups_arg = None if axis_index_groups is None else [list(i) for i in axis_index_groups]  # type: ignore[attr-defined]

    def total(value: jax.Array) -> jax.Array:
        return value if axis_name is None else _psum(value, axis_name, groups_arg)

    def count(like: jax.Array) -> jax.Array:
        return total(jnp.asarray(plan.group_size, like.dtype))

    def grouped(per_channel: jax.Array) -> jax.Array:
        s = per_channel.shape
        return per_channel.reshape((*s[:c], g, s[c] // g, *s[c + 1 :]))

    def per_group(per_channel: jax.Array) -> jax.Array:
        return jnp.sum(grouped(per_channel), axis=c + 1)

    def group_sum(values: jax.Array) -> jax.Array:
        return per_group(jnp.sum(values, axis=axes, keepdims=True))

    def shifted_sums(xv: jax.Array, shift: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Per-group ``sum(x - shift)`` and ``sum((x - shift) ** 2)``.

        The two spell ``x - shift`` differently (``x + (-shift)`` and ``shift - x``, equal in floating
        point up to sign) on purpose: XLA would otherwise share one ``x - shift`` between both
        reductions and write it to memory, instead of fusing it into each of them.
        """
        if shift is None:
            s1, s2 = jnp.sum(xv, axis=axes, keepdims=True), jnp.sum(jnp.square(xv), axis=axes, keepdims=True)
        else:
            sc = to_channels(shift, plan)
            s1 = jnp.sum(xv + (-sc), axis=axes, keepdims=True)
            s2 = jnp.sum(jnp.square(sc - xv), axis=axes, keepdims=True)
        return total(per_group(s1)), total(per_group(s2))

    def rescaled(xv: jax.Array) -> Moments:
        """The moments where the plain sums overflowed: of ``x * unit`` with ``unit`` from the group's
        largest ``|x|``, all in range (the shift taken twice, as the sampled one may be far off)."""
        n = count(xv)
        biggest = jnp.max(grouped(jnp.max(jnp.abs(xv), axis=axes, keepdims=True)), axis=c + 1)
        if axis_name is not None:
            biggest = _pmax(biggest, axis_name, groups_arg)
        unit = _unit(jnp.frexp(biggest)[1], xv.dtype)
        xs = xv * to_channels(unit, plan)
        if plan.mean_close_to_zero:
            shift = jnp.zeros((), xv.dtype)
            s1, s2 = shifted_sums(xs, None)
        else:
            shift_s = total(group_sum(xs)) / n
            shift_s = shift_s + shifted_sums(xs, shift_s)[0] / n
            s1, s2 = shifted_sums(xs, shift_s)
            shift = shift_s / unit
        mean = s1 / n
        var = jnp.maximum(s2 / n - jnp.square(mean), 0)
        return shift, mean / unit, var, unit

    def moments(xv: jax.Array) -> Moments:
        n = count(xv)
        if plan.mean_close_to_zero:
            shift = jnp.zeros((), xv.dtype)
            s1, s2 = shifted_sums(xv, None)
        else:
            sample_axis = None if axis_name is not None else _sample_axis(plan, layout, xv.shape)
            if sample_axis is None:
                # With devices: each device's mean of its shard, averaged: the same shift everywhere.
                shift = total(group_sum(xv)) / n
                s1, s2 = shifted_sums(xv, shift)
            else:
                size = xv.shape[sample_axis] // SAMPLE_FRACTION
                part = jax.lax.slice_in_dim(xv, 0, size, axis=sample_axis)
                shift = group_sum(part) / (n * size / xv.shape[sample_axis])
                s1, s2 = shifted_sums(xv, shift)
                m0 = s1 / n
                far = _any(jnp.square(m0) > s2 / n - jnp.square(m0))

                def again(args: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
                    old, first, _ = args
                    new = old + first / n
                    return (new, *shifted_sums(xv, new))

                shift, s1, s2 = jax.lax.cond(far, again, lambda args: args, (shift, s1, s2))
        mean = s1 / n
        var = jnp.maximum(s2 / n - jnp.square(mean), 0)
        # Scaling the variance by a power of two (>= 1) is exact: the same result, in range.
        unit = _unit(jnp.frexp(var)[1] // 2, var.dtype)
        plain = (shift, mean, var * unit * unit, unit)
        overflowed = _any(~jnp.isfinite(var))
        return cast(Moments, jax.lax.cond(overflowed, lambda ops: rescaled(ops[0]), lambda ops: ops[1], (xv, plain)))

    @jax.custom_jvp
    def stats(xv: jax.Array) -> Moments:
        return moments(xv)

    @stats.defjvp
    def stats_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[Moments, Moments]:
        (xv,), (dx,) = primals, tangents
        shift, mean, var, unit = stats(xv)
        n = count(xv)
        dmean = total(group_sum(dx)) / n
        # in units of ``unit``: (x - mean) * unit is in range where its square is not
        centered = ((xv - to_channels(shift, plan)) - to_channels(mean, plan)) * to_channels(unit, plan)
        dvar = total(group_sum(centered * dx)) * (2 * unit / n)
        return (shift, mean, var, unit), (jnp.zeros_like(shift), dmean, dvar, jnp.zeros_like(unit))

    return cast(Callable[[jax.Array], Moments], stats)


def _clear_last_bit(values: jax.Array) -> jax.Array:
    """``values`` with the lowest mantissa bit cleared: within one unit in the last place, and the
    difference is exact in floating point."""
    uint = jnp.uint64 if values.dtype == jnp.float64 else jnp.uint32
    bits = jax.lax.bitcast_convert_type(values, uint)
    return jax.lax.bitcast_convert_type(bits & ~jnp.asarray(1, uint), values.dtype)


def to_channels(per_group: jax.Array, plan: Plan) -> jax.Array:
    """Per-group statistics (groups on :func:`_layout`'s channel axis) repeated for each channel."""
    if per_group.ndim == 0:
        return per_group
    c = _layout(plan).channel
    s = per_group.shape
    wide = jnp.broadcast_to(jnp.expand_dims(per_group, c + 1), (*s[: c + 1], plan.group_channels, *s[c + 1 :]))
    return wide.reshape((*s[:c], plan.channels, *s[c + 1 :]))


def _activate(y: jax.Array, activation: Activation) -> jax.Array:
    if activation == "relu":
        return jax.nn.relu(y)
    if activation == "silu":
        return jax.nn.silu(y)
    if activation == "gelu":
        return jax.nn.gelu(y, approximate=False)
    return y


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
    dims = x.shape
    layout = _layout(plan)
    view = layout.shape(dims)
    xv = x.reshape(view).astype(work)
    shift, mean, var, unit = _moments_fn(plan, axis_name, axis_index_groups)(xv)
    # ``var`` is the variance times ``unit ** 2`` (see ``_moments_fn``): in range, as is the result.
    rstd = jax.lax.rsqrt(var + jnp.asarray(plan.epsilon, work) * unit * unit) * unit
    param_shape = tuple(plan.channels if i == layout.channel else 1 for i in range(len(view)))
    scale = to_channels(rstd, plan)
    if gamma is not None:
        scale = scale * gamma.astype(work).reshape(param_shape)
    if plan.mean_close_to_zero:
        centered, mean_here = xv, mean
    else:
        # The output's own shift: the statistics' shift with its last mantissa bit cleared. The two
        # differ by an exactly representable amount, folded into the mean below, so the result is the
        # same; but being a different value, XLA fuses each use of ``x - shift`` into its own pass
        # (forward statistics, output, and under autodiff the backward reductions) instead of sharing
        # one and writing it to memory.
        near = _clear_last_bit(shift)
        centered = xv - to_channels(near, plan)
        mean_here = (shift - near) + mean
    offset = -to_channels(mean_here, plan) * scale
    if beta is not None:
        offset = offset + beta.astype(work).reshape(param_shape)
    y = centered * scale + offset
    return _activate(y, activation).astype(x.dtype).reshape(dims)


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
