"""The group normalization contract, resolved once per (shape, arguments).

This module is the only place that validates arguments and raises the contract's errors. It is pure
Python and imports no array library: every backend and front-end describes its input by a static shape
(a tuple whose entries are ints, or ``None`` for a dimension only known at run time) and a dtype name,
and gets back an immutable :class:`Plan` that says how to compute.

How a plan views the input
--------------------------
The channel axis ``c`` of size ``C`` is split into ``(groups, C // groups)``. In that *split* view (rank
``r + 1``) the statistics run over the within-group channel axis and the reduction axes; every other
axis, including the group axis, is *kept*. Neighbouring split axes that are all reduced, or all kept, are
merged into one axis of the *statistics view*, so that a backend reduces over as few, as large and as
contiguous axes as the layout allows. For NCHW input with the default NCHW axes the statistics view is
``(N * G, C // G * H * W)``; for NHWC it is ``(N, H * W, G, C // G)``.

Statistics computed in the statistics view with ``keepdims`` reshape to `Plan.stats_shape` (the split
view with every reduced axis set to 1), which broadcasts against the split view of the input, as do
per-channel coefficients of `Plan.coef_shape` and parameters reshaped to `Plan.param_shape`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "ACTIVATIONS",
    "FLOAT_DTYPES",
    "Activation",
    "MaskError",
    "Plan",
    "check_mask",
    "make_plan",
    "resolve_activation",
]

FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
"""Dtype names a plan accepts; every backend maps its own dtype objects to these names."""

ACTIVATIONS = ("relu", "silu", "gelu")
"""Activations a backend may fuse, by name. ``"gelu"`` is the exact (erf) form."""

Activation = str | Callable[[Any], Any] | None
"""What `resolve_activation` returns: nothing, a fusable name, or the user's callable."""

Dim = TypeVar("Dim")


def _product(dims: Sequence[Dim]) -> Dim | int:
    """Product of dims that may be ints or a framework's scalar tensors (kept as such)."""
    if not dims:
        return 1
    result: Any = dims[0]
    for d in dims[1:]:
        result = result * d
    return result  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Plan:
    """A validated group normalization: what to reduce, what to keep, and how to view the input.

    Made by `make_plan` (never directly), immutable and cached. Axis fields are non-negative and refer to
    the input. Methods that take ``dims`` expect the input's run-time shape (ints, or a framework's scalar
    tensors for dynamic dimensions) and return tuples suitable for that framework's ``reshape``.

    Example:
        An NHWC batch: each of the 8 images has 32 statistics, over 32 x 32 pixels and 2 channels each.

        >>> import groupnorm
        >>> plan = groupnorm.make_plan((8, 32, 32, 64), "float32", groups=32)
        >>> plan.channels_axis, plan.reduction_axes, plan.kept_axes, plan.group_size
        (3, (1, 2), (0,), 2048)
        >>> plan.view_shape(plan.shape), plan.view_reduce_axes  # reduce axes 1 and 3 of this view
        ((8, 1024, 32, 2), (1, 3))
        >>> plan.stats_shape(plan.shape), plan.param_shape
        ((8, 1, 1, 32, 1), (1, 1, 1, 32, 2))
    """

    shape: tuple[int | None, ...]
    """The static shape the plan was made for; ``None`` marks a dimension known only at run time."""
    dtype: str
    """The input's dtype name: one of `FLOAT_DTYPES`."""
    channels_axis: int
    """The channel axis, non-negative."""
    reduction_axes: tuple[int, ...]
    """The axes statistics run over besides the group's channels: sorted, non-negative."""
    kept_axes: tuple[int, ...]
    """Axes of the input over which statistics are *not* shared, other than the channel axis."""
    groups: int
    """G, the number of groups; it divides `channels`."""
    channels: int
    """C, the size of the channel axis."""
    epsilon: float
    """Added to the variance: finite and >= 0."""
    mean_close_to_zero: bool
    """``True``: one-pass statistics (sum and sum of squares, clamped at zero); ``False``: stable ones."""
    view_runs: tuple[tuple[int, int], ...]
    """Runs ``(start, stop)`` of split-view axes merged into one axis of the statistics view."""
    view_reduce_axes: tuple[int, ...]
    """Axes of the statistics view to reduce over."""

    @property
    def rank(self) -> int:
        """The input's rank, ``len(shape)``."""
        return len(self.shape)

    @property
    def group_channels(self) -> int:
        """Channels per group, ``C // G``."""
        return self.channels // self.groups

    @property
    def split_reduce_axes(self) -> tuple[int, ...]:
        """Reduced axes of the split view (rank + 1): the reduction axes and the within-group axis."""
        c = self.channels_axis
        shifted = (a if a < c else a + 1 for a in self.reduction_axes)
        return tuple(sorted((c + 1, *shifted)))

    @property
    def group_size(self) -> int:
        """How many elements each mean and variance is taken over."""
        size = self.group_channels
        for a in self.reduction_axes:
            size *= self.shape[a]  # type: ignore[operator]  # reduction dims are static by contract
        return size

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Where a ``[C]`` parameter reshapes to broadcast against the split view."""
        c = self.channels_axis
        return (1,) * c + (self.groups, self.group_channels) + (1,) * (self.rank - c - 1)

    def split_shape(self, dims: Sequence[Dim]) -> tuple[Dim | int, ...]:
        """The input's shape with the channel axis split into ``(groups, C // groups)``."""
        c = self.channels_axis
        return (*dims[:c], self.groups, self.group_channels, *dims[c + 1 :])

    def view_shape(self, dims: Sequence[Dim]) -> tuple[Dim | int, ...]:
        """Shape of the statistics view: runs of like split axes merged."""
        split = self.split_shape(dims)
        return tuple(_product(split[start:stop]) for start, stop in self.view_runs)

    def corner_index(self, rank: int, span: int) -> tuple[slice, ...]:
        """An index into the statistics view (``rank`` axes) that picks a few elements of every group:
        the first along each reduced axis, the first ``span`` along the innermost one."""
        reduce = self.view_reduce_axes
        return tuple(
            (slice(0, span) if a == reduce[-1] else slice(0, 1)) if a in reduce else slice(None) for a in range(rank)
        )

    def stats_shape(self, dims: Sequence[Dim]) -> tuple[Dim | int, ...]:
        """Shape of per-group statistics that broadcast against the split view."""
        reduced = set(self.split_reduce_axes)
        return tuple(1 if i in reduced else d for i, d in enumerate(self.split_shape(dims)))

    def coef_shape(self, dims: Sequence[Dim]) -> tuple[Dim | int, ...]:
        """Shape of per-(kept index, channel) coefficients that broadcast against the split view."""
        reduced = set(self.split_reduce_axes) - {self.channels_axis + 1}
        return tuple(1 if i in reduced else d for i, d in enumerate(self.split_shape(dims)))


def _axis(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}.")
    return int(value)


def _canonical_axes(reduction_axes: object) -> tuple[int, ...]:
    if isinstance(reduction_axes, numbers.Integral) and not isinstance(reduction_axes, bool):
        return (int(reduction_axes),)
    if isinstance(reduction_axes, str | bytes) or not isinstance(reduction_axes, Sequence):
        raise TypeError(
            "reduction_axes must be an int or a sequence of ints, "
            f"got {reduction_axes!r} of type {type(reduction_axes).__name__}."
        )
    return tuple(_axis(a, "each of reduction_axes") for a in reduction_axes)


def _canonical_shape(shape: object, name: str) -> tuple[int | None, ...] | None:
    if shape is None:
        return None
    try:
        dims: tuple[Any, ...] = tuple(shape)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be a sequence of dimensions, got {shape!r}.") from None
    out: list[int | None] = []
    for d in dims:
        if d is None:
            out.append(None)
        elif isinstance(d, numbers.Integral) and not isinstance(d, bool) and int(d) >= 0:
            out.append(int(d))
        else:
            raise TypeError(f"{name} must hold non-negative ints or None, got {shape!r}.")
    return tuple(out)


def make_plan(
    shape: Sequence[int | None] | None,
    dtype: str,
    *,
    groups: int = 32,
    channels_axis: int = -1,
    reduction_axes: int | Sequence[int] = (-3, -2),
    epsilon: float = 1e-6,
    mean_close_to_zero: bool = False,
    gamma_shape: Sequence[int | None] | None = None,
    beta_shape: Sequence[int | None] | None = None,
) -> Plan:
    """Validate group normalization arguments for an input and resolve them into a `Plan`.

    The one place the contract is checked: every front-end calls it before computing anything. Plans
    are cached, so a second call with the same arguments returns the same object at the cost of a dict
    lookup.

    Args:
        shape: the input's static shape: a sequence of non-negative ints, with ``None`` for a dimension
            known only at run time (only kept axes such as the batch may be dynamic); ``None`` for an
            input of unknown rank (an error).
        dtype: the input's dtype by name: ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"float64"``.
        groups: G, the number of groups the channel axis is split into; a positive int that divides the
            channel count. Default ``32``.
        channels_axis: the channel axis; negative values count from the end. Default ``-1`` (NHWC).
        reduction_axes: an int or a sequence of ints: the axes statistics run over besides the group's
            channels; may be empty; must not name the channel axis or one axis twice. Default ``(-3, -2)``
            (H and W of NHWC).
        epsilon: added to the variance; finite and >= 0. Default ``1e-6``.
        mean_close_to_zero: ``False`` (default): numerically stable statistics; ``True``: one-pass sums
            as TensorFlow 1.15 did, faster and inaccurate where the mean is large against the spread.
        gamma_shape: the scale's shape where one is given (it must be ``[C]``); default ``None``, no scale.
        beta_shape: the offset's shape where one is given (it must be ``[C]``); default ``None``, no offset.

    Returns:
        The validated, immutable `Plan`.

    Raises:
        TypeError: an argument of the wrong type: a dtype that is not a name or not floating-point,
            non-int groups or axes (bools included), a non-real epsilon, a non-bool mean_close_to_zero.
        ValueError: a wrong value, with TensorFlow 1.15's phrase where it had one (see the contract's
            table of errors): unknown rank, an axis out of bounds, a dynamic channel or reduction
            dimension, overlapping or repeated axes, groups that do not divide the channels, a negative
            or non-finite epsilon, parameters of the wrong shape.

    Example:
        NCHW input with a dynamic batch, 8 groups of 8 channels:

        >>> from groupnorm import make_plan
        >>> plan = make_plan((None, 64, 16, 16), "float32", groups=8, channels_axis=1, reduction_axes=(2, 3))
        >>> plan.kept_axes, plan.view_shape((4, 64, 16, 16))  # one statistic per (image, group)
        ((0,), (32, 2048))
        >>> make_plan((8, 32, 32, 60), "float32", groups=32)
        Traceback (most recent call last):
        ...
        ValueError: 60 channels is not commensurate with 32 groups.
    """
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be given by name, got {dtype!r}.")
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"groups must be a positive int, got {groups!r} of type {type(groups).__name__}.")
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"epsilon must be a real number, got {epsilon!r} of type {type(epsilon).__name__}.")
    if not isinstance(mean_close_to_zero, bool):
        raise TypeError(f"mean_close_to_zero must be a bool, got {mean_close_to_zero!r}.")
    key = (
        _canonical_shape(shape, "shape"),
        dtype,
        int(groups),
        _axis(channels_axis, "channels_axis"),
        _canonical_axes(reduction_axes),
        float(epsilon),
        bool(mean_close_to_zero),
        _canonical_shape(gamma_shape, "gamma's shape"),
        _canonical_shape(beta_shape, "beta's shape"),
    )
    # A plain dict rather than functools.lru_cache: graph tracers (torch.compile) follow a dict lookup
    # without warnings, and every key is already canonical (plain ints, tuples, str, float, bool).
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _make_plan(*key)
    return plan


_PLANS: dict[tuple[Any, ...], Plan] = {}
_MAX_PLANS = 1024


def _make_plan(
    shape: tuple[int | None, ...] | None,
    dtype: str,
    groups: int,
    channels_axis: int,
    reduction_axes: tuple[int, ...],
    epsilon: float,
    mean_close_to_zero: bool,
    gamma_shape: tuple[int | None, ...] | None,
    beta_shape: tuple[int | None, ...] | None,
) -> Plan:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"group normalization needs a floating-point input ({', '.join(sorted(FLOAT_DTYPES))}), got {dtype}."
        )
    if shape is None:
        raise ValueError("Input has undefined rank.")
    rank = len(shape)

    def in_bounds(axis: int, name: str) -> int:
        if not -rank <= axis < rank:
            raise ValueError(f"Axis is out of bounds. {name}={axis} for an input of rank {rank}.")
        return axis % rank

    c = in_bounds(channels_axis, "channels_axis")
    channels = shape[c]
    if channels is None:
        raise ValueError(f"Input has undefined channel dimension: axis {c}.")

    axes = tuple(in_bounds(a, "reduction_axes") for a in reduction_axes)
    for given, a in zip(reduction_axes, axes, strict=True):
        if shape[a] is None:
            raise ValueError(f"Input has undefined dimensions along reduction axis {given}.")
        if a == c:
            raise ValueError(
                "reduction_axis must be mutually exclusive with channels_axis: "
                f"both name axis {c} of an input of rank {rank}."
            )
    if len(set(axes)) != len(axes):
        raise ValueError(f"reduction_axes name the same axis twice: {reduction_axes} for rank {rank}.")

    if groups <= 0:
        raise ValueError(f"groups must be a positive int, got {groups}.")
    if groups > channels:
        raise ValueError(f"Invalid groups {groups} for {channels} channels.")
    if channels % groups:
        raise ValueError(f"{channels} channels is not commensurate with {groups} groups.")

    if not math.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon}.")

    for name, pshape in (("gamma", gamma_shape), ("beta", beta_shape)):
        if pshape is not None and pshape != (channels,):
            shown = list(pshape)
            raise ValueError(f"{name} must have shape [{channels}] (one value per channel), got {shown}.")

    reduced = set(axes)
    kept = tuple(a for a in range(rank) if a != c and a not in reduced)
    split_reduced = [a in reduced for a in range(c)] + [False, True] + [a in reduced for a in range(c + 1, rank)]
    runs: list[tuple[int, int]] = []
    for i, is_reduced in enumerate(split_reduced):
        if runs and split_reduced[runs[-1][0]] == is_reduced:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    view_reduce = tuple(j for j, (start, _) in enumerate(runs) if split_reduced[start])

    return Plan(
        shape=shape,
        dtype=dtype,
        channels_axis=c,
        reduction_axes=tuple(sorted(axes)),
        kept_axes=kept,
        groups=groups,
        channels=channels,
        epsilon=epsilon,
        mean_close_to_zero=mean_close_to_zero,
        view_runs=tuple(runs),
        view_reduce_axes=view_reduce,
    )


def resolve_activation(activation: object) -> Activation:
    """Validate an activation: ``None``, a callable, or one of `ACTIVATIONS` by name (any case).

    Args:
        activation: ``None`` (no activation), a callable applied to the normalized output, or the name of
            an activation backends fuse: ``"relu"``, ``"silu"`` or ``"gelu"`` (the exact, erf form).

    Returns:
        ``None``, the callable unchanged, or the name in lower case.

    Raises:
        ValueError: an unknown activation name.
        TypeError: anything else (neither ``None``, a callable nor a string).

    Example:
        >>> from groupnorm._plan import resolve_activation
        >>> resolve_activation("SiLU"), resolve_activation(None)
        ('silu', None)
    """
    if activation is None or callable(activation):
        return activation  # type: ignore[return-value]
    if isinstance(activation, str):
        name = activation.lower()
        if name in ACTIVATIONS:
            return name
        raise ValueError(f"Unknown activation {activation!r}; use a callable or one of {', '.join(ACTIVATIONS)}.")
    raise TypeError(
        f"activation must be None, a callable or one of {', '.join(ACTIVATIONS)}; "
        f"got {activation!r} of type {type(activation).__name__}."
    )


class MaskError(ValueError, TypeError):
    """A mask of the wrong dtype or shape. A ``ValueError``, as NumPy's and JAX's broadcasting and
    reductions raise for one, and a ``TypeError``, as JAX's reshape of the wrong size raises.

    Example:

    >>> plan = make_plan((2, 4, 4, 6), "float32", groups=3)
    >>> try:
    ...     check_mask(plan, (2, 5, 1, 1), "bool")
    ... except MaskError as e:
    ...     print(isinstance(e, ValueError), isinstance(e, TypeError))
    True True
    """


def check_mask(plan: Plan, shape: Sequence[int | None] | None, dtype: str) -> None:
    """Validate a mask for an input of ``plan``: boolean, and broadcastable to the input's shape (by
    NumPy's rules: trailing axes aligned, each of size 1 or the input's). Dimensions only known at run
    time (``None``) are left to the run-time broadcast.

    Args:
        plan: the input's validated plan.
        shape: the mask's static shape (``None`` for an unknown rank, ``None`` entries for dynamic sizes).
        dtype: the mask's dtype name; must be ``"bool"``.

    Raises:
        MaskError: for a mask that is not boolean or does not broadcast to the input.

    Example:

    >>> plan = make_plan((2, 4, 4, 6), "float32", groups=3)
    >>> check_mask(plan, (2, 4, 4, 1), "bool")     # one value per pixel: fine
    """
    if dtype != "bool":
        raise MaskError(f"mask must be None or a boolean array, got dtype {dtype}.")
    if shape is None:
        raise MaskError("mask has undefined rank.")
    dims = tuple(shape)
    fits = len(dims) <= plan.rank and all(
        m is None or d is None or m in (1, d) for m, d in zip(reversed(dims), reversed(plan.shape), strict=False)
    )
    if not fits:
        shown, input_shape = list(dims), list(plan.shape)
        raise MaskError(f"mask of shape {shown} does not broadcast to the input's shape {input_shape}.")
