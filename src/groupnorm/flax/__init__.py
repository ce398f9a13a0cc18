"""groupnorm for Flax: a drop-in for ``flax.nnx.GroupNorm`` (here) and for ``flax.linen.GroupNorm``
(:mod:`groupnorm.flax.linen`), and the functional :func:`group_norm` with statistics across devices
and masks.

Swapping ``nnx.GroupNorm`` for ``groupnorm.flax.GroupNorm`` keeps every constructor argument, default and
parameter name (``scale``, ``bias``), so existing models and their saved parameters keep working. What
changes:

- The variance is numerically stable whatever ``use_fast_variance`` says (see :class:`GroupNorm`);
  Flax's one-pass variance loses all precision when a group's mean is large against its spread.
- ``reduction_axes`` may be any subset of the axes; Flax requires the last (feature) axis in it. The
  channel axis may be listed or not: its group's channels are always reduced over.
- New arguments from groupnorm's contract: ``channels_axis`` (NCHW and other layouts), ``activation``
  (``"relu"``, ``"silu"``, ``"gelu"``, fused, or any callable) and ``mean_close_to_zero``.
- ``mask`` (Flax's semantics: statistics over the unmasked elements, every element normalized with
  them) keeps the stable numerics; it may be any boolean array that broadcasts to the input; a group
  with no unmasked element normalizes to zero where Flax's gives NaN; and with ``axis_name`` the
  statistics are those of all devices' unmasked elements together (Flax averages each device's).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from functools import partial
from types import MappingProxyType
from typing import Any, cast

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from groupnorm import _masked
from groupnorm._api import Backend, plan_for
from groupnorm._plan import Activation, make_plan, resolve_activation
from groupnorm.backends import jax as jax_backend

__all__ = ["ArgumentError", "GroupNorm", "group_norm"]

_ZEROS = nnx.initializers.zeros_init()
_ONES = nnx.initializers.ones_init()


class ArgumentError(ValueError, TypeError):
    """Invalid groups: a ``ValueError``, as Flax raises, that is also the ``TypeError`` groupnorm's plan
    raises for groups of the wrong type.

    Example::

        >>> from flax import nnx
        >>> try:
        ...     GroupNorm(12, num_groups=5, rngs=nnx.Rngs(0))
        ... except ArgumentError as e:
        ...     print(isinstance(e, ValueError))
        True
    """


def check_groups(channels: int, groups: Any) -> None:
    """The plan's check of ``groups`` for ``channels`` channels, its error worded as Flax's too."""
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 0:
        make_plan((channels,), "float32", groups=groups, channels_axis=0, reduction_axes=())  # the plan's error
        return
    try:
        make_plan((channels,), "float32", groups=groups, channels_axis=0, reduction_axes=())
    except (TypeError, ValueError) as error:
        raise ArgumentError(
            f"{error} Number of groups ({groups}) does not divide the number of channels ({channels})."
        ) from error


def resolve_groups(
    num_features: int | None, num_groups: int | None, group_size: int | None, noun: str = "features"
) -> int:
    """Flax's ``num_groups`` / ``group_size`` pair as a number of groups (the plan validates it);
    ``noun`` names the channels as Flax's error does (NNX: features, Linen: channels)."""
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            "Either `num_groups` or `group_size` should be specified. If `group_size` is to be specified, "
            "pass `num_groups=None` as argument to override the default `num_groups` value of 32."
        )
    if group_size is None:
        return num_groups  # type: ignore[return-value]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}.")
    if num_features is not None and num_features % group_size:
        raise ValueError(f"Number of {noun} ({num_features}) is not multiple of the group size ({group_size}).")
    return max(1, (num_features or 0) // group_size)


def contract_axes(ndim: int, channels_axis: int, reduction_axes: int | Sequence[int] | None) -> Any:
    """Flax's ``reduction_axes`` (which name the feature axis, and default to every axis but the first)
    as groupnorm's (which never name the channel axis). Anything that is not a valid axis is passed on
    unchanged, for the plan to reject with the contract's error."""
    if isinstance(channels_axis, bool) or not isinstance(channels_axis, int) or not -ndim <= channels_axis < ndim:
        return () if reduction_axes is None else reduction_axes
    c = channels_axis % ndim
    if reduction_axes is None:
        return tuple(a for a in range(1, ndim) if a != c)
    axes = (reduction_axes,) if isinstance(reduction_axes, int) else reduction_axes
    if not isinstance(axes, Sequence) or isinstance(axes, str | bytes):
        return reduction_axes

    def names_channel(a: object) -> bool:
        return isinstance(a, int) and not isinstance(a, bool) and -ndim <= a < ndim and a % ndim == c

    return tuple(a for a in axes if not names_channel(a))


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
    mask: Any = None,
) -> jax.Array:
    """:func:`groupnorm.group_norm` for JAX arrays, with statistics across devices and masks together.

    ``axis_name`` names a mapped axis (of ``shard_map`` or ``pmap``) over which the input's groups are
    sharded, and ``axis_index_groups`` restricts it to subsets of devices, as in ``jax.lax.psum``: the
    statistics then run over every device's shard (see :func:`groupnorm.backends.jax.group_norm`).
    ``mask``, a boolean array that broadcasts to the input (this device's shard of it, with
    ``axis_name``), restricts them to the elements where it is true (see :func:`groupnorm.group_norm`);
    with ``axis_name`` the counts and sums of all devices are added, so the result is the unsharded one.

    Args:
        inputs: a floating-point JAX array (this device's shard of it, with ``axis_name``).
        groups: how many groups to split the channels into (default 32); must divide the channel count.
        channels_axis: the channel axis (default -1).
        reduction_axes: the axes statistics run over besides the group's channels (default ``(-3, -2)``).
        gamma: optional per-channel scale, shape ``[C]``.
        beta: optional per-channel offset, shape ``[C]``.
        epsilon: added to the variance (default 1e-6); must be >= 0.
        activation_fn: ``None``, a callable, or ``"relu"``, ``"silu"``, ``"gelu"`` (fused).
        mean_close_to_zero: one-pass sums instead of the shifted, exact variance (default False).
        axis_name: a mapped axis over which the input is sharded (default None).
        axis_index_groups: subsets of devices on ``axis_name`` (default None), as ``jax.lax.psum``.
        mask: an optional boolean array broadcastable to the input: statistics over its true elements.

    Example::

        >>> import jax.numpy as jnp
        >>> x = jnp.ones((2, 4, 4, 8)).at[:, 0].set(3.0)
        >>> y = group_norm(x, 4, mask=jnp.arange(4)[None, :, None, None] > 0)   # row 0 left out
        >>> y.shape
        (2, 4, 4, 8)
    """
    if mask is None:
        return jax_backend.group_norm(
            inputs,
            groups,
            channels_axis,
            reduction_axes,
            gamma=gamma,
            beta=beta,
            epsilon=epsilon,
            activation_fn=activation_fn,
            mean_close_to_zero=mean_close_to_zero,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
        )
    x = jnp.asarray(inputs)
    plan = plan_for(
        cast(Backend, jax_backend),
        x,
        groups=groups,
        channels_axis=channels_axis,
        reduction_axes=reduction_axes,
        gamma=gamma,
        beta=beta,
        epsilon=epsilon,
        mean_close_to_zero=mean_close_to_zero,
    )
    across: _masked.Across = None
    if axis_name is not None:
        groups_arg = None if axis_index_groups is None else [list(g) for g in axis_index_groups]
        across = (
            partial(jax.lax.psum, axis_name=axis_name, axis_index_groups=groups_arg),
            partial(jax.lax.pmax, axis_name=axis_name, axis_index_groups=groups_arg),
        )
    activation = resolve_activation(activation_fn)
    return cast(jax.Array, _masked.execute(plan, x, mask, gamma, beta, activation, "jax", across=across))


def apply(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    groups: int,
    channels_axis: int,
    reduction_axes: int | Sequence[int] | None,
    epsilon: float,
    activation: Activation,
    mean_close_to_zero: bool,
    axis_name: Hashable,
    axis_index_groups: Any,
    mask: Any = None,
) -> jax.Array:
    """The layers' shared call: translate Flax's conventions and run :func:`group_norm`."""
    return group_norm(
        x,
        groups,
        channels_axis,
        contract_axes(x.ndim, channels_axis, reduction_axes),
        gamma=scale,
        beta=bias,
        epsilon=epsilon,
        activation_fn=activation,
        mean_close_to_zero=mean_close_to_zero,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        mask=mask,
    )


class GroupNorm(nnx.Module):
    """Group normalization (Wu & He, 2018) for Flax NNX: a drop-in for ``flax.nnx.GroupNorm``.

    The channel axis (``channels_axis``, the last by default) is split into ``num_groups`` groups of
    consecutive channels (or groups of ``group_size`` channels); each group's mean and variance are taken
    over its channels and the ``reduction_axes``, separately for every index of the other axes; the
    result is ``(x - mean) / sqrt(var + epsilon) * scale + bias``, then ``activation``.

    Args:
        num_features: the number of channels ``C``.
        num_groups: the number of groups (default 32); pass ``None`` to give ``group_size`` instead.
        group_size: the number of channels per group.
        epsilon: added to the variance.
        dtype: the result's dtype (default: promoted from the input and the parameters, as Flax does).
            Statistics always accumulate in at least float32.
        param_dtype: the parameters' dtype.
        use_bias: whether to learn ``bias`` (shape ``[C]``).
        use_scale: whether to learn ``scale`` (shape ``[C]``).
        bias_init: ``bias``'s initializer.
        scale_init: ``scale``'s initializer.
        reduction_axes: the axes statistics run over, as Flax names them: an int or a sequence, with or
            without the channel axis; ``None`` (default) is every axis but the first (the batch).
            Unlike Flax, any subset is allowed (for example ``(1,)``, statistics over time only).
        axis_name: a mapped axis (``shard_map``/``pmap``) over which the input is sharded: statistics
            then run over every device's shard, and the result equals the unsharded one.
        axis_index_groups: subsets of devices on ``axis_name`` to reduce within, as ``jax.lax.psum``.
        use_fast_variance: accepted for compatibility, and does not change the numerics. Flax's fast
            variance is the one-pass ``E[x^2] - E[x]^2``, which loses every digit when a group's mean is
            large against its spread; groupnorm's stable algorithm is as fast, so it is used either
            way. Ask for the one-pass sums explicitly with ``mean_close_to_zero=True``.
        promote_dtype: how the input and parameters are promoted to a common dtype, as in Flax.
        rngs: the random number generators for the parameters' initializers.
        bias_metadata: metadata for ``bias``.
        scale_metadata: metadata for ``scale``.
        channels_axis: the channel axis (default -1, as in Flax; for example ``1`` for NCHW input).
        activation: ``None``, a callable, or ``"relu"``, ``"silu"``, ``"gelu"`` (exact), fused.
        mean_close_to_zero: ``True`` selects one-pass sums of ``x`` and ``x**2`` (clamped at zero),
            accurate only where the mean is small against the spread.

    Raises:
        ArgumentError: (a ``ValueError`` and a ``TypeError``) for groups that are not a positive int
            dividing ``num_features``, with Flax's phrase "does not divide the number of channels".
        ValueError: for the other errors Flax raises (``num_groups`` with ``group_size``, ...) and the
            contract's (see :func:`groupnorm.group_norm`).

    Example::

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = GroupNorm(64, num_groups=32, rngs=nnx.Rngs(0))   # as nnx.GroupNorm(64, num_groups=32, ...)
        >>> layer(jnp.ones((2, 8, 8, 64))).shape
        (2, 8, 8, 64)
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = 32,
        group_size: int | None = None,
        *,
        epsilon: float = 1e-6,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Callable[..., Any] = _ZEROS,
        scale_init: Callable[..., Any] = _ONES,
        reduction_axes: int | Sequence[int] | None = None,
        axis_name: Hashable = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Callable[..., Any] = nnx_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        channels_axis: int = -1,
        activation: Activation = None,
        mean_close_to_zero: bool = False,
    ) -> None:
        groups = resolve_groups(num_features, num_groups, group_size)
        # Validate the groups (and epsilon, activation) now, with the contract's errors.
        check_groups(num_features, groups)
        make_plan((num_features,), "float32", groups=groups, reduction_axes=(), epsilon=epsilon)
        resolve_activation(activation)
        self.feature_axis = channels_axis
        self.num_features = num_features
        self.num_groups = groups
        self.group_size = num_features // groups
        feature_shape = (num_features,)
        self.scale: nnx.Param[jax.Array] | None
        if use_scale:
            self.scale = nnx.Param(scale_init(rngs.params(), feature_shape, param_dtype), **scale_metadata)
        else:
            self.scale = nnx.data(None)
        self.bias: nnx.Param[jax.Array] | None
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), feature_shape, param_dtype), **bias_metadata)
        else:
            self.bias = nnx.data(None)
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.channels_axis = channels_axis
        self.activation = activation
        self.mean_close_to_zero = mean_close_to_zero

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalize ``x``.

        ``mask``: ``None``, or a boolean array that broadcasts to ``x``'s shape; the statistics then run
        over the elements where it is true only, and every element (masked or not) is normalized with
        them. A group with no unmasked element normalizes to zero: its outputs are ``bias`` (through
        the activation), and its input gets no gradient.
        """
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        x, scale, bias = self.promote_dtype((x, scale, bias), dtype=self.dtype)
        return apply(
            x,
            scale,
            bias,
            groups=self.num_groups,
            channels_axis=self.channels_axis,
            reduction_axes=self.reduction_axes,
            epsilon=self.epsilon,
            activation=self.activation,
            mean_close_to_zero=self.mean_close_to_zero,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            mask=mask,
        )
