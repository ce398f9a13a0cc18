"""``GroupNormalization`` for Keras 3: a drop-in for ``keras.layers.GroupNormalization``.

It takes every argument of Keras's layer with the same defaults and behaviour and has the same weights
(``gamma`` then ``beta``, shape ``[C]``), so swapping the import changes nothing for existing models and
their saved weights load. It adds the contract's ``reduction_axes``, a fused ``activation`` and
``mean_close_to_zero``, and is numerically exact where Keras's layer is not (a group whose mean is large
against its spread). It runs on every Keras backend (see :mod:`groupnorm.backends.keras`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from groupnorm._plan import ACTIVATIONS, Plan, make_plan
from groupnorm.backends import keras as backend

__all__ = ["GroupNormalization"]


def _resolve_activation(activation: Any) -> Any:
    """None, a fusable name, or a callable (Keras's activations by name included)."""
    if activation is None or callable(activation):
        return activation
    if isinstance(activation, str) and activation.lower() in ACTIVATIONS:
        return activation.lower()
    return keras.activations.get(activation)


@keras.saving.register_keras_serializable(package="groupnorm")
class GroupNormalization(keras.layers.Layer):  # type: ignore[misc]
    """Group normalization (Wu & He, 2018) as a Keras layer.

    With the default ``reduction_axes=None`` it is ``keras.layers.GroupNormalization``: statistics over
    every axis but the first (batch) and ``axis`` (the channels, split into ``groups`` groups).

    Args:
        groups: number of groups; ``-1`` for one group per channel (instance normalization).
        axis: the channel axis.
        epsilon: added to the variance.
        center, scale: create and use ``beta`` / ``gamma``.
        beta_initializer, gamma_initializer, beta_regularizer, gamma_regularizer, beta_constraint,
            gamma_constraint: as for Keras's layer.
        reduction_axes: the axes statistics run over besides the group's channels; ``None`` for every
            axis but the first and ``axis``. Axes left out are kept (for example, time in video).
        activation: ``None``, ``"relu"``, ``"silu"`` or ``"gelu"`` (exact; fused), or any Keras
            activation (name or callable), applied to the output.
        mean_close_to_zero: ``True`` for one-pass statistics (faster; clamped so never NaN).
        **kwargs: base layer arguments (``name``, ``dtype``, ...).
    """

    def __init__(
        self,
        groups: int = 32,
        axis: int = -1,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        reduction_axes: int | Sequence[int] | None = None,
        activation: Any = None,
        mean_close_to_zero: bool = False,
        **kwargs: Any,
    ) -> None:
        # fail at construction, as Keras's layer does, on what does not depend on the input: the
        # plan of a one-group-per-channel input with `groups` channels checks groups and epsilon
        probe = 1 if groups == -1 else groups
        channels = probe if isinstance(probe, int) and not isinstance(probe, bool) and probe > 0 else 1
        make_plan(
            (channels,),
            "float32",
            groups=probe,
            channels_axis=0,
            reduction_axes=(),
            epsilon=epsilon,
            mean_close_to_zero=mean_close_to_zero,
        )
        super().__init__(**kwargs)
        self.supports_masking = True
        self.autocast = False
        self.groups = groups
        self.axis = axis
        self.epsilon = epsilon
        self.center = center
        self.scale = scale
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_constraint = keras.constraints.get(beta_constraint)
        self.gamma_constraint = keras.constraints.get(gamma_constraint)
        self.reduction_axes = (
            reduction_axes if reduction_axes is None or isinstance(reduction_axes, int) else tuple(reduction_axes)
        )
        self.activation = _resolve_activation(activation)
        self.mean_close_to_zero = mean_close_to_zero
        self.gamma: Any = None
        self.beta: Any = None

    def _plan(self, shape: Sequence[int | None] | None, dtype: str) -> Plan:
        """The validated plan for an input of ``shape``: the only place arguments are checked."""
        rank = None if shape is None else len(shape)
        groups: Any = self.groups
        reduction_axes: Any = self.reduction_axes
        if shape is not None and rank is not None and isinstance(self.axis, int) and not isinstance(self.axis, bool):
            if groups == -1 and -rank <= self.axis < rank and shape[self.axis] is not None:
                groups = shape[self.axis]
            if reduction_axes is None:
                channel = self.axis % rank if -rank <= self.axis < rank else None
                reduction_axes = tuple(a for a in range(1, rank) if a != channel)
        elif reduction_axes is None:
            reduction_axes = ()
        return make_plan(
            shape,
            dtype,
            groups=groups,
            channels_axis=self.axis,
            reduction_axes=reduction_axes,
            epsilon=self.epsilon,
            mean_close_to_zero=self.mean_close_to_zero,
        )

    def build(self, input_shape: Any) -> None:
        shape = None if input_shape is None else tuple(input_shape)
        plan = self._plan(shape, "float32")
        if self.groups == -1:
            self.groups = plan.groups
        self.input_spec = keras.layers.InputSpec(ndim=plan.rank, axes={self.axis: plan.channels})
        if self.scale:
            self.gamma = self.add_weight(
                shape=(plan.channels,),
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=(plan.channels,),
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                autocast=False,
            )
        super().build(input_shape)

    def call(self, inputs: Any) -> Any:
        plan = self._plan(backend.static_shape(inputs), backend.dtype_name(inputs))
        outputs = backend.execute(plan, inputs, self.gamma, self.beta, self.activation)
        return keras.ops.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        activation = self.activation
        if callable(activation):
            activation = keras.activations.serialize(activation)
        config = {
            "groups": self.groups,
            "axis": self.axis,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": keras.initializers.serialize(self.beta_initializer),
            "gamma_initializer": keras.initializers.serialize(self.gamma_initializer),
            "beta_regularizer": keras.regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": keras.regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": keras.constraints.serialize(self.beta_constraint),
            "gamma_constraint": keras.constraints.serialize(self.gamma_constraint),
            "reduction_axes": list(self.reduction_axes)
            if isinstance(self.reduction_axes, tuple)
            else self.reduction_axes,
            "activation": activation,
            "mean_close_to_zero": self.mean_close_to_zero,
        }
        return {**super().get_config(), **config}
