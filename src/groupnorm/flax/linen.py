"""groupnorm for Flax Linen: a drop-in for ``flax.linen.GroupNorm``.

Same attributes, defaults and parameter names (``scale``, ``bias``) as Flax's layer, so a model that
swaps the import keeps its parameters; plus ``channels_axis``, ``activation`` and
``mean_close_to_zero``, and ``reduction_axes`` that need not include the last axis. See
:class:`groupnorm.flax.GroupNorm` for the meaning of each argument.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as linen_dtypes

from groupnorm._plan import Activation
from groupnorm.flax import apply, check_groups, resolve_groups

__all__ = ["GroupNorm"]


class GroupNorm(nn.Module):
    """Group normalization (Wu & He, 2018) for Flax Linen: a drop-in for ``flax.linen.GroupNorm``.

    Attributes are Flax's, with the same defaults, plus groupnorm's ``channels_axis`` (default -1),
    ``activation`` (default None) and ``mean_close_to_zero`` (default False). As in
    :class:`groupnorm.flax.GroupNorm`, ``use_fast_variance`` does not change the numerics (the stable
    variance is used; ask for one-pass sums with ``mean_close_to_zero=True``), and
    ``force_float32_reductions`` is accepted for compatibility: statistics always accumulate in at
    least float32. The result's dtype is ``dtype`` where given, else the promotion of the input's and
    the parameters' dtypes, as in Flax.

    Example::

        >>> import jax
        >>> import jax.numpy as jnp
        >>> layer = GroupNorm(num_groups=32)                          # as flax.linen.GroupNorm(num_groups=32)
        >>> x = jnp.ones((2, 8, 8, 64))
        >>> params = layer.init(jax.random.key(0), x)
        >>> layer.apply(params, x).shape
        (2, 8, 8, 64)
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable[..., Any] = nn.initializers.zeros
    scale_init: Callable[..., Any] = nn.initializers.ones
    reduction_axes: int | Sequence[int] | None = None
    axis_name: Hashable = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    channels_axis: int = -1
    activation: Activation = None
    mean_close_to_zero: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Normalize ``x``; ``mask`` as for :class:`groupnorm.flax.GroupNorm`: statistics over the
        elements where it is true, every element normalized with them."""
        x = jnp.asarray(x)
        channels = x.shape[self.channels_axis] if -x.ndim <= self.channels_axis < x.ndim else None
        groups = resolve_groups(channels, self.num_groups, self.group_size, "channels")
        if channels is not None:
            check_groups(channels, groups)
        shape = (channels if channels is not None else 0,)
        scale = self.param("scale", self.scale_init, shape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, shape, self.param_dtype) if self.use_bias else None
        args = [a for a in (x, scale, bias) if a is not None]
        out_dtype = linen_dtypes.canonicalize_dtype(*args, dtype=self.dtype)
        compute = jnp.result_type(*args)
        y = apply(
            x.astype(compute),
            None if scale is None else scale.astype(compute),
            None if bias is None else bias.astype(compute),
            groups=groups,
            channels_axis=self.channels_axis,
            reduction_axes=self.reduction_axes,
            epsilon=self.epsilon,
            activation=self.activation,
            mean_close_to_zero=self.mean_close_to_zero,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            mask=mask,
        )
        return y.astype(out_dtype)
