"""``group_norm`` for any supported array type: finds the backend, makes the plan, runs it."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Protocol, TypeVar, cast

from groupnorm._plan import Activation, Plan, make_plan, resolve_activation

__all__ = ["Backend", "backend_for", "group_norm", "param_shape", "plan_for"]

ArrayT = TypeVar("ArrayT")

#: (framework module, backend module, the array type as users know it). A backend is imported only
#: once its framework has been imported by the user, so ``import groupnorm`` imports no framework.
_BACKENDS: tuple[tuple[str, str, str], ...] = (
    ("numpy", "groupnorm.backends.numpy", "numpy.ndarray"),
    ("torch", "groupnorm.backends.torch", "torch.Tensor"),
    ("jax", "groupnorm.backends.jax", "jax.Array"),
    ("tensorflow", "groupnorm.backends.tensorflow", "tf.Tensor"),
)


class Backend(Protocol):
    """What a backend module provides (see ``groupnorm.backends.numpy`` for the reference)."""

    NAME: str

    def is_array(self, x: object) -> bool: ...

    def static_shape(self, x: Any) -> tuple[int | None, ...] | None: ...

    def dtype_name(self, x: Any) -> str: ...

    def execute(self, plan: Plan, x: Any, gamma: Any, beta: Any, activation: Activation) -> Any: ...


def backend_for(x: object) -> Backend:
    """The backend module for ``x``'s array type; ``TypeError`` naming the supported types otherwise."""
    for framework, module_name, _ in _BACKENDS:
        if framework in sys.modules:
            module: ModuleType = importlib.import_module(module_name)
            backend = cast(Backend, module)
            if backend.is_array(x):
                return backend
    supported = ", ".join(type_name for _, _, type_name in _BACKENDS)
    raise TypeError(f"group_norm does not support inputs of type {type(x).__qualname__}; supported: {supported}.")


def param_shape(p: object, name: str) -> tuple[int | None, ...] | None:
    """The shape of an optional parameter, for :func:`~groupnorm._plan.make_plan`."""
    if p is None:
        return None
    shape = getattr(p, "shape", None)
    if shape is None:
        raise TypeError(f"{name} must be an array of shape [C] or None, got {type(p).__qualname__}.")
    return tuple(None if d is None else int(d) for d in shape)


def plan_for(
    backend: Backend,
    inputs: Any,
    *,
    groups: int,
    channels_axis: int,
    reduction_axes: int | Sequence[int],
    gamma: Any,
    beta: Any,
    epsilon: float,
    mean_close_to_zero: bool,
) -> Plan:
    """The validated plan for ``inputs`` of ``backend``'s array type and the given arguments."""
    return make_plan(
        backend.static_shape(inputs),
        backend.dtype_name(inputs),
        groups=groups,
        channels_axis=channels_axis,
        reduction_axes=reduction_axes,
        epsilon=epsilon,
        mean_close_to_zero=mean_close_to_zero,
        gamma_shape=param_shape(gamma, "gamma"),
        beta_shape=param_shape(beta, "beta"),
    )


def group_norm(
    inputs: ArrayT,
    groups: int = 32,
    channels_axis: int = -1,
    reduction_axes: int | Sequence[int] = (-3, -2),
    *,
    gamma: Any = None,
    beta: Any = None,
    epsilon: float = 1e-6,
    activation_fn: Activation = None,
    mean_close_to_zero: bool = False,
    mask: Any = None,
) -> ArrayT:
    """Group normalization with the semantics of TensorFlow 1.15's ``tf.contrib.layers.group_norm``.

    The channel axis is split into ``groups`` groups of ``C // groups`` consecutive channels. Mean and
    (population) variance are taken over one group's channels and the ``reduction_axes``, separately for
    every index of every other axis; then ``y = (x - mean) / sqrt(var + epsilon) * gamma + beta``, then
    ``activation_fn``. Negative axes count from the end, so the defaults read NHWC with or without a
    batch axis.

    Args:
        inputs: a floating-point array: ``numpy.ndarray``, ``torch.Tensor``, ``jax.Array`` or
            ``tf.Tensor``; the result has the same type, shape and dtype.
        groups: how many groups to split the channels into; must divide the channel count.
        channels_axis: the channel axis.
        reduction_axes: the axes statistics are accumulated over besides the group's channels.
        gamma: optional per-channel scale, shape ``[C]``, of the input's array type.
        beta: optional per-channel offset, shape ``[C]``, of the input's array type.
        epsilon: added to the variance; must be >= 0.
        activation_fn: ``None``, a callable applied to the output, or ``"relu"``, ``"silu"`` or
            ``"gelu"`` (exact, erf form), which backends fuse.
        mean_close_to_zero: ``False`` (default) uses a numerically stable variance; ``True`` one-pass
            sums (as TF 1.15 did, faster where the mean is small against the spread), clamped at zero.
        mask: ``None``, or a boolean array that broadcasts to the input's shape: the statistics then
            run over the elements where it is true only, and every element is normalized with them
            (Flax's semantics). A group with no unmasked element normalizes to zero (its outputs are
            ``beta``, through the activation) and passes no gradient to the input. The mask may be
            of any array type the input's library converts (a NumPy array for a tensor, say).

    Raises:
        TypeError: for an unsupported array type, a non-floating input, or arguments of the wrong type.
        ValueError: for the contract's errors (see the README), before any computation.
        MaskError: (both a ValueError and a TypeError) for a mask that is not boolean or does not
            broadcast to the input.

    Example: an NHWC batch of 2 images, 4 x 4 pixels, 6 channels in 3 groups. Each statistic runs
    over one image's 4 x 4 pixels and 2 channels (32 values); the batch axis is kept.

    >>> import numpy as np
    >>> x = np.arange(2 * 4 * 4 * 6, dtype=np.float64).reshape(2, 4, 4, 6) ** 1.5
    >>> y = group_norm(x, groups=3)
    >>> blocks = y.reshape(2, 16, 3, 2)          # (batch, pixels, group, channel in group)
    >>> bool(np.allclose(blocks.mean(axis=(1, 3)), 0))   # one mean per (image, group)
    True
    >>> np.round(blocks.std(axis=(1, 3)), 4)     # sqrt(var / (var + epsilon))
    array([[1., 1., 1.],
           [1., 1., 1.]])

    The same statistics on NCHW input: ``group_norm(x.transpose(0, 3, 1, 2), 3, channels_axis=1,
    reduction_axes=(2, 3))``; without a batch axis the defaults still read (H, W, C) correctly.
    """
    backend = backend_for(inputs)
    plan = plan_for(
        backend,
        inputs,
        groups=groups,
        channels_axis=channels_axis,
        reduction_axes=reduction_axes,
        gamma=gamma,
        beta=beta,
        epsilon=epsilon,
        mean_close_to_zero=mean_close_to_zero,
    )
    activation = resolve_activation(activation_fn)
    if mask is not None:
        from groupnorm import _masked

        return cast(ArrayT, _masked.execute(plan, inputs, mask, gamma, beta, activation, backend.NAME))
    return cast(ArrayT, backend.execute(plan, inputs, gamma, beta, activation))
