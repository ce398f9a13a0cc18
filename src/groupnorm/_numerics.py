"""The numerics of group normalization, stated once for every backend.

:mod:`groupnorm._plan` says *what* is computed; this module says *how*. It imports no array library: the
formulas take an array namespace (:class:`Ops`, a few lines per backend) and the reductions over a
group are supplied by the backend (:class:`Passes`), which keeps its own array code and accelerators.
Every backend follows the steps below; the NumPy backend is their plain transcription, and each backend is
tested against it.

Notation
--------
For one *group* -- one index of every kept axis and one group of ``cg = C // G`` channels -- ``x_i`` are
its ``n = cg * R`` elements (``R`` the product of the reduced dimensions). All arithmetic is in the *work
dtype* (:func:`work_dtype`): float64 for float64 input, float32 for float16, bfloat16 and float32.

1. The shift ``K`` (default mode; ``mean_close_to_zero=True`` uses ``K = 0``)
    The *corner* of a group is its ``cg`` channels at the first ``m = min(CORNER, R)`` positions of the
    reduced axes, flattened row-major in the input's axis order (:func:`corner`); ``m * cg`` elements.
    With ``a`` the corner's first element (the group's first channel at position 0)::

        K = a + sum_corner(x - a) / (m * cg)

    that is, the corner's mean, anchored at ``a`` so that a corner of equal values gives ``K`` equal to
    them exactly (and a constant group gives ``x - K = 0`` exactly). For NCHW input the corner is the
    first 8 contiguous elements of each of the group's channels; for NHWC the first 8 pixels, each a
    contiguous run of ``cg`` channels: a fixed handful of elements a C or GPU kernel reads in a few
    loads, whatever the layout. It spans all of the group's channels, so per-channel offsets (the usual
    cause of a large mean) enter ``K`` with the same weights as they enter the mean.

2. Statistics: one pass
    ``d = x - K``; ``s1 = sum(d)``, ``s2 = sum(d * d)``; ``mean = s1 / n`` (the mean of ``x - K``) and
    ``var = max(s2 / n - mean**2, 0)``. Because ``x - K`` is exact for values near the mean, the
    variance loses only about ``(1 + (mean / std)**2)`` units in the last place -- the *shift's*
    distance from the mean, not the mean's distance from zero.

3. The rescue, for any group whose pass fails these checks (:func:`passes_checks`)
    * ``var <= BIG`` (false for overflowed, infinite and NaN statistics): squares stay in range.
    * ``var + epsilon >= TINY``: squares of typical deviations are normal numbers (only matters for
      ``epsilon`` below ``TINY``).
    * default mode only: ``mean**2 <= FAR * var``: ``K`` lies within ``sqrt(FAR) = 4`` standard
      deviations of the mean (a corner unlike the rest of its group), so step 2's accuracy holds.

    A flagged group is computed again in *units* ``u``, an exact power of two (:func:`rescue_unit`)::

        M  = max |x| over the group                   (one pass)
        u  = 2**-e,  e = frexp exponent of M, clamped to [E_MIN, E_MAX] of the work dtype
        Ku = the corner shift of step 1 applied to x * u
        c  = Ku + sum(x * u - Ku) / n                  (one pass: the group's mean, in units, near exact)
        s1, s2 = sums of (x * u - c) and its square   (one pass)
        K = c;  mean = s1 / n;  var = max(s2 / n - mean**2, 0)

    so ``|x * u| < 1`` (up to 4 at the clamp) and every square is in range, wherever in the group the
    large values lie. Unflagged groups keep step 2's values and ``u = 1``, untouched: the rescue is
    chosen per group by a select, and run when any group of the call needs it -- a data-dependent
    *conditional* (``lax.cond``, ``tf.cond``, a plain ``if`` in NumPy), never a data-dependent Python
    branch, so it works under ``jit``, ``tf.function`` and XLA. A group holding NaN or Inf has no
    answer: it comes out NaN, and no other group is touched.

    The statistics of every group are thus four numbers (:class:`Stats`): ``shift`` ``K`` and ``unit``
    ``u``, and the ``mean`` and ``var`` of ``x * u - K``; the group's mean is ``(K + mean) / u`` and its
    variance ``var / u**2`` (never formed: it may be out of range).

4. The normalizer (:func:`normalizer`)
    ``eps_u = max(epsilon * u**2, min(epsilon, SMALLEST_NORMAL))`` (``= epsilon`` where ``u = 1``),
    ``rstd_u = 1 / sqrt(var + eps_u)``: normalizes ``x * u - K``. For the input gradient, the reciprocal
    standard deviation in the input's units, ``r = u * rstd_u``, except ``r = 1 / sqrt(epsilon)`` where
    ``var == 0`` (exactly its value there, where ``epsilon * u**2`` may underflow).

5. The output (:func:`output_coefficients`)
    ``xhat = (x * u - K - mean) * rstd_u``; ``y = act(xhat * gamma + beta)``, formed per channel as::

        y = act((x * u - K) * scale + offset),   scale = rstd_u * gamma,   offset = beta - mean * scale

    (``x * u`` is ``x`` itself where ``u = 1``, which a backend may use.)

6. Gradients, for the output's cotangent ``dy`` (:func:`input_gradient`)
    ``pre = (x * u - K) * scale + offset``, ``g = dy * act'(pre)`` (``g = dy`` without activation);
    ``dbeta = sum(g)`` and ``dgamma = sum(g * xhat)`` over every axis but the channel axis; per group
    ``m1 = mean(gamma * g)``, ``m2 = mean(gamma * g * xhat)``; and::

        dx = r * (gamma * g - m1 - xhat * m2)

    In fused form ``dx = (r * gamma) * g - (r * rstd_u * m2) * (x * u - K) + r * (rstd_u * m2 * mean - m1)``;
    every factor is in range because the rescue keeps ``var`` within ``[TINY, BIG]``.

7. Activations (:func:`activate`, :func:`activation_grad`)
    ``relu(y) = max(y, 0)``, ``relu'(p) = [p > 0]``; ``silu(y) = y * s``, ``s = 1 / (1 + exp(-y))``,
    ``silu'(p) = s * (1 + p * (1 - s))``; ``gelu(y) = y * P(y)`` (exact, erf form),
    ``P(y) = (1 + erf(y / sqrt 2)) / 2``, ``gelu'(p) = P(p) + p * exp(-p**2 / 2) / sqrt(2 pi)``.

Why this shift
--------------
The result does not depend on ``K`` (to rounding); its accuracy does, through ``(mean - K) / std``. The
group's own mean (NumPy's former choice) costs a pass; a sampled fraction of the group costs a strided
pass whose elements depend on the layout. The corner costs a few loads, is the same set of elements in
every layout and on every backend (so backends agree to rounding), and the ``FAR`` check catches the
data it misrepresents (a constant border, a dark corner in a bright image) at the price of the rescue's
passes for those calls only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

__all__ = [
    "CORNER",
    "FAR",
    "Corner",
    "Limits",
    "Ops",
    "Passes",
    "Stats",
    "activate",
    "activation_grad",
    "corner",
    "input_gradient",
    "limits",
    "moments",
    "normalizer",
    "output_coefficients",
    "passes_checks",
    "rescue_unit",
    "shift_from_corner",
    "statistics",
    "work_dtype",
]

#: how many leading positions of a group's reduced axes (flattened row-major) its shift averages.
CORNER = 8
#: the shift must lie within ``sqrt(FAR)`` standard deviations of the mean, or the group is rescued.
FAR = 16.0

Array = Any


@dataclass(frozen=True)
class Limits:
    """The thresholds of one work dtype (see the module docstring, steps 3 and 4)."""

    dtype: str
    big: float
    """``var`` above this is rescued: squares of deviations near it keep a margin of ``2**32`` to the
    dtype's largest number (float32: ``2**96``)."""
    tiny: float
    """``var + epsilon`` below this is rescued: such squares keep a margin of ``2**30`` above the
    smallest normal number (float32: ``2**-96``)."""
    e_min: int
    """The rescue's unit ``2**-e`` never scales up by more than ``2**-e_min`` (so ``u**2`` is finite)."""
    e_max: int
    """... and never down by more than ``2**-e_max`` (so ``u`` is a normal number)."""
    smallest_normal: float
    mantissa_bits: int
    exponent_bias: int


_LIMITS = {
    "float32": Limits("float32", 2.0**96, 2.0**-96, -62, 126, 2.0**-126, 23, 127),
    "float64": Limits("float64", 2.0**960, 2.0**-960, -510, 1022, 2.0**-1022, 52, 1023),
}


def work_dtype(dtype: str) -> str:
    """The dtype statistics are computed in, for an input dtype's name."""
    return "float64" if dtype == "float64" else "float32"


def limits(dtype: str) -> Limits:
    """The :class:`Limits` of the work dtype for an input dtype's name."""
    return _LIMITS[work_dtype(dtype)]


class Corner(NamedTuple):
    """Where a group's corner lies in its reduced axes (see :func:`corner`)."""

    box: tuple[int, ...]
    """A leading box, one extent per reduced axis, that holds the corner: ``x[:b1, :b2, ...]``. Its
    extents are ``1, ..., 1, b, d_j+1, ..., d_k`` (full inner extents), so the corner is the first
    :attr:`size` elements of the box flattened row-major."""
    size: int
    """How many positions: ``min(CORNER, prod(dims))``."""

    @property
    def exact(self) -> bool:
        """Whether the box is the corner (no mask needed)."""
        return math.prod(self.box) == self.size


def corner(dims: Sequence[int]) -> Corner:
    """The corner of a group whose reduced axes (in the input's order) have extents ``dims``: the first
    ``min(CORNER, prod(dims))`` positions of those axes flattened row-major, as a leading box to slice
    and how many of the box's leading (row-major) positions belong to it."""
    dims = tuple(int(d) for d in dims)
    m = min(CORNER, math.prod(dims))
    box: list[int] = []
    inner = 1
    for d in reversed(dims):
        box.append(min(d, -(-m // inner)) if m else 0)
        inner *= d
    box.reverse()
    return Corner(tuple(box), m)


class Ops(Protocol):
    """The few array functions the formulas need beyond arithmetic operators and comparisons."""

    def where(self, condition: Array, a: Array, b: Array) -> Array: ...

    def maximum(self, a: Array, b: Array) -> Array: ...

    def rsqrt(self, a: Array) -> Array: ...

    def exp(self, a: Array) -> Array: ...

    def erf(self, a: Array) -> Array: ...

    def exponent(self, a: Array) -> Array:
        """``frexp``'s exponent of finite ``a > 0`` (an integer array); any integer elsewhere."""
        ...

    def power_of_two(self, e: Array) -> Array:
        """``2.0 ** e`` in the work dtype for an integer array ``e`` within its normal range."""
        ...

    def all(self, flags: Array) -> Array:
        """Whether every one of ``flags`` is true, as a predicate :meth:`cond` takes."""
        ...

    def cond(self, predicate: Array, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
        """``true_fn()`` if ``predicate`` else ``false_fn()``; both return the same structure."""
        ...


class Stats(NamedTuple):
    """Per-group statistics (see the module docstring, step 3): the mean and variance of ``x * unit - shift``."""

    shift: Array
    unit: Array
    mean: Array
    var: Array


class Passes(Protocol):
    """The reductions over each group that :func:`statistics` asks a backend for. Every argument and
    result is per group, in the backend's shape for per-group values (broadcast by the backend)."""

    def corner_shift(self, unit: Array | None) -> Array:
        """Step 1's ``K`` of ``x * unit`` (``unit=None``: of ``x``), via :func:`shift_from_corner`."""
        ...

    def sums(self, shift: Array | None, unit: Array | None) -> tuple[Array, Array]:
        """``sum(x * unit - shift)`` and ``sum((x * unit - shift) ** 2)``; ``None``: no shift, unit 1."""
        ...

    def centre(self, shift: Array, unit: Array) -> Array:
        """``sum(x * unit - shift)`` (a backend may return ``sums(shift, unit)[0]``)."""
        ...

    def max_abs(self) -> Array:
        """``max |x|`` (NaN where the group holds NaN)."""
        ...


def shift_from_corner(first: Array, total_difference: Array, count: int) -> Array:
    """Step 1: ``K`` from the corner's first element ``a`` and ``sum_corner(x - a)`` over ``count``
    corner elements."""
    return first + total_difference / count


def moments(s1: Array, s2: Array, n: Array, ops: Ops) -> tuple[Array, Array]:
    """Step 2: the mean and the (clamped) variance from the sums over ``n`` elements."""
    mean = s1 / n
    return mean, ops.maximum(s2 / n - mean * mean, 0.0)


def passes_checks(mean: Array, var: Array, epsilon: float, shifted: bool, lim: Limits) -> Array:
    """Step 3's checks: true for every group whose one-pass statistics stand, false for those the rescue
    recomputes (NaN fails every comparison). Written without a logical negation, which TensorFlow's graph
    optimizer would fold into the opposite comparison, wrongly for NaN."""
    ok = (var <= lim.big) & (var + epsilon >= lim.tiny)
    if shifted:
        ok = ok & (mean * mean <= FAR * var)
    return ok


def rescue_unit(biggest: Array, ops: Ops, lim: Limits) -> Array:
    """Step 3's unit ``u = 2**-e`` for a group whose largest ``|x|`` is ``biggest``."""
    e = ops.exponent(biggest)
    e = ops.where(e < lim.e_min, lim.e_min, ops.where(e > lim.e_max, lim.e_max, e))
    return ops.power_of_two(-e)


def statistics(passes: Passes, n: Array, epsilon: float, shifted: bool, lim: Limits, ops: Ops) -> Stats:
    """Steps 1 to 3 for every group: the ordinary pass, then the rescue where any group needs it. ``n``
    is the number of elements per group (an int, or an array where it is only known when run)."""
    shift = passes.corner_shift(None) if shifted else None
    s1, s2 = passes.sums(shift, None)
    mean, var = moments(s1, s2, n, ops)
    ok = passes_checks(mean, var, epsilon, shifted, lim)
    # ones (and zeros) of the per-group shape and dtype: exact wherever no group is flagged, which is
    # the only case in which ``plain`` is the result
    zero = mean * 0
    plain = Stats(zero if shift is None else shift, zero + 1.0, mean, var)

    def rescue() -> Stats:
        unit = ops.where(ok, 1.0, rescue_unit(passes.max_abs(), ops, lim))
        ku = passes.corner_shift(unit)
        centre = ku + passes.centre(ku, unit) / n
        t1, t2 = passes.sums(centre, unit)
        mean_r, var_r = moments(t1, t2, n, ops)
        return Stats(
            ops.where(ok, plain.shift, centre),
            unit,
            ops.where(ok, plain.mean, mean_r),
            ops.where(ok, plain.var, var_r),
        )

    return ops.cond(ops.all(ok), lambda: plain, rescue)  # type: ignore[no-any-return]


def normalizer(stats: Stats, epsilon: float, lim: Limits, ops: Ops) -> tuple[Array, Array]:
    """Step 4: ``(rstd_u, r)``, the reciprocal standard deviation of ``x * u - K`` and in input units."""
    u = stats.unit
    eps_u = ops.maximum(epsilon * (u * u), min(epsilon, lim.smallest_normal))
    rstd_u = ops.rsqrt(stats.var + eps_u)
    r = ops.where(stats.var > 0, u * rstd_u, 1.0 / math.sqrt(epsilon) if epsilon > 0 else math.inf)
    return rstd_u, r


def output_coefficients(mean: Array, rstd_u: Array, gamma: Array | None, beta: Array | None) -> tuple[Array, Array]:
    """Step 5: ``(scale, offset)`` with ``y = act((x * u - K) * scale + offset)``; ``mean`` and ``rstd_u``
    broadcast to the channels, ``gamma``/``beta`` per channel (``None``: 1 and 0)."""
    scale = rstd_u if gamma is None else rstd_u * gamma
    offset = -mean * scale if beta is None else beta - mean * scale
    return scale, offset


def input_gradient(g_gamma: Array, xhat: Array, m1: Array, m2: Array, r: Array) -> Array:
    """Step 6: ``dx = r * (gamma * g - m1 - xhat * m2)`` from ``gamma * g`` and the per-group means."""
    return r * (g_gamma - m1 - xhat * m2)


_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def activate(name: str | None, y: Array, ops: Ops) -> Array:
    """Step 7: the fusable activation ``name`` (or none) of ``y``."""
    if name is None:
        return y
    if name == "relu":
        return ops.maximum(y, 0.0)
    if name == "silu":
        return y / (1.0 + ops.exp(-y))
    if name == "gelu":
        return y * (0.5 + 0.5 * ops.erf(y * _SQRT_HALF))
    raise ValueError(f"unknown activation {name!r}")


def activation_grad(name: str, pre: Array, ops: Ops) -> Array:
    """Step 7: the derivative of activation ``name`` at the pre-activation ``pre``."""
    if name == "relu":
        return ops.where(pre > 0, 1.0, 0.0)
    if name == "silu":
        s = 1.0 / (1.0 + ops.exp(-pre))
        return s * (1.0 + pre * (1.0 - s))
    if name == "gelu":
        return (0.5 + 0.5 * ops.erf(pre * _SQRT_HALF)) + pre * ops.exp(-0.5 * pre * pre) * _INV_SQRT_2PI
    raise ValueError(f"unknown activation {name!r}")
