"""``GroupNormalization`` for Keras 3: a drop-in for ``keras.layers.GroupNormalization``.

It takes every argument of Keras's layer with the same defaults and behaviour and has the same weights
(``gamma`` then ``beta``, shape ``[C]``) and, with its own arguments at their defaults, the same config,
so swapping the import changes nothing for existing models: either class loads the other's config,
``.keras`` files and weights. It adds the contract's ``reduction_axes``, a fused ``activation`` and
``mean_close_to_zero`` (in the config only when set), masked statistics (``mask`` in ``call``), and is
numerically exact where Keras's layer is not (a group whose mean is large against its spread). It runs
on every Keras backend (see :mod:`groupnorm.backends.keras`).
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras

from groupnorm import _masked
from groupnorm._plan import ACTIVATIONS, Plan, make_plan
from groupnorm.backends import keras as backend

__all__ = ["ArgumentError", "GroupNormalization", "load_model"]


class ArgumentError(ValueError, TypeError):
    """An invalid constructor argument: a ``ValueError``, as Keras's layer raises, that is also the
    ``TypeError`` groupnorm's plan raises for an argument of the wrong type.

    Example::

        >>> try:
        ...     GroupNormalization(groups=1.5)
        ... except ArgumentError as e:
        ...     print(isinstance(e, ValueError), isinstance(e, TypeError))
        True True
    """


def _plan_groups(groups: Any) -> Any:
    """Keras's ``groups`` as the plan takes it: Keras accepts a bool (an int to Python), the plan does not."""
    return int(groups) if isinstance(groups, bool) else groups


def _keras_wording(error: ValueError, shape: Sequence[int | None], axis: Any, groups: Any) -> ValueError:
    """The plan's error on building, with the phrases of Keras's layer added where it has one."""
    rank = len(shape)
    if not (isinstance(axis, int) and -rank <= axis < rank):
        return error
    channels = shape[axis]
    if channels is None:
        phrase = (
            f"Axis {axis} of input tensor should have a defined dimension but the layer received an input "
            f"with shape {tuple(shape)}."
        )
    elif isinstance(groups, int) and groups > channels:
        phrase = f"Number of groups ({groups}) cannot be more than the number of channels ({channels})."
    elif isinstance(groups, int) and groups > 0 and channels % groups:
        phrase = f"Number of groups ({groups}) must be a multiple of the number of channels ({channels})."
    else:
        return error
    return ValueError(f"{error} {phrase}")


#: groupnorm's own arguments and their defaults: in the config only when set otherwise
_EXTRAS: dict[str, Any] = {"reduction_axes": None, "activation": None, "mean_close_to_zero": False}


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
        center: create and use ``beta``.
        scale: create and use ``gamma``.
        beta_initializer: as for Keras's layer.
        gamma_initializer: as for Keras's layer.
        beta_regularizer: as for Keras's layer.
        gamma_regularizer: as for Keras's layer.
        beta_constraint: as for Keras's layer.
        gamma_constraint: as for Keras's layer.
        reduction_axes: the axes statistics run over besides the group's channels; ``None`` for every
            axis but the first and ``axis``. Axes left out are kept (for example, time in video).
        activation: ``None``, ``"relu"``, ``"silu"`` or ``"gelu"`` (exact; fused), or any Keras
            activation (name or callable), applied to the output.
        mean_close_to_zero: ``True`` for one-pass statistics (faster; clamped so never NaN).
        **kwargs: base layer arguments (``name``, ``dtype``, ...).

    Raises:
        ArgumentError: (a ``ValueError`` and a ``TypeError``) for ``groups`` that is not a positive int
            or -1, with Keras's phrase "argument `groups`".
        ValueError: for the contract's errors on building, with Keras's phrases added where Keras has
            one (undefined channel dimension, more groups than channels, groups not dividing them).

    ``call(inputs, mask=None)``: with a boolean ``mask`` the statistics run over the elements where it
    is true only, and every element is normalized with them. A mask of one rank less than the input
    (Keras's masks of timesteps, as from ``Masking`` or ``Embedding(mask_zero=True)``, which Keras
    passes on by itself) marks positions: it applies to every channel (an axis is inserted at
    ``axis``). Otherwise it must broadcast to the input's shape. A group with no unmasked element
    normalizes to zero (its outputs are ``beta``). Keras's own layer ignores masks.

    Example::

        >>> import keras
        >>> layer = GroupNormalization(groups=8)                      # as keras.layers.GroupNormalization(8)
        >>> y = layer(keras.random.normal((2, 16, 16, 32)))
        >>> keras.layers.GroupNormalization.from_config(layer.get_config()).groups   # configs interchange
        8
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
        # fail at construction, as Keras's layer does, on what does not depend on the input: the plan
        # of a one-group-per-channel input with `groups` channels checks groups, then epsilon
        probe = _plan_groups(groups)
        probe = 1 if probe == -1 else probe
        channels = probe if isinstance(probe, int) and probe > 0 else 1
        try:
            make_plan((channels,), "float32", groups=probe, channels_axis=0, reduction_axes=())
        except (TypeError, ValueError) as error:
            raise ArgumentError(
                f"Invalid argument `groups`: {error} It must be a positive int, or -1 for one group per "
                f"channel (instance normalization). Received: groups={groups!r}."
            ) from error
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
        groups: Any = _plan_groups(self.groups)
        reduction_axes: Any = self.reduction_axes
        if shape is not None and rank is not None and isinstance(self.axis, int) and not isinstance(self.axis, bool):
            if groups == -1 and -rank <= self.axis < rank and shape[self.axis] is not None:
                groups = shape[self.axis]
            if reduction_axes is None:
                channel = self.axis % rank if -rank <= self.axis < rank else None
                reduction_axes = tuple(a for a in range(1, rank) if a != channel)
        elif reduction_axes is None:
            reduction_axes = ()
        try:
            return make_plan(
                shape,
                dtype,
                groups=groups,
                channels_axis=self.axis,
                reduction_axes=reduction_axes,
                epsilon=self.epsilon,
                mean_close_to_zero=self.mean_close_to_zero,
            )
        except ValueError as error:
            if shape is None:
                raise
            worded = _keras_wording(error, shape, self.axis, groups)
            if worded is error:
                raise
            raise worded from error

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

    def call(self, inputs: Any, mask: Any = None) -> Any:
        plan = self._plan(backend.static_shape(inputs), backend.dtype_name(inputs))
        if mask is None:
            outputs = backend.execute(plan, inputs, self.gamma, self.beta, self.activation)
        else:
            xp = _masked.ops_for("keras")
            mask = xp.as_mask(mask, inputs)
            if len(mask.shape) == plan.rank - 1:
                mask = keras.ops.expand_dims(mask, plan.channels_axis)
            outputs = _masked.masked_group_norm(plan, inputs, mask, self.gamma, self.beta, self.activation, xp)
        return keras.ops.cast(outputs, self.compute_dtype)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        nodes = len(self._inbound_nodes)
        outputs = super().__call__(*args, **kwargs)
        if len(self._inbound_nodes) > nodes:
            # Keras passes mask=None to a call() that takes a mask and records it in the functional
            # graph; left out, saved models load with Keras's own layer too, whose call() takes none.
            node = self._inbound_nodes[-1]
            recorded = node.arguments.kwargs
            if "mask" in recorded and recorded["mask"] is None:
                rest = {k: v for k, v in recorded.items() if k != "mask"}
                node.arguments = type(node.arguments)(*node.arguments.args, **rest)
        return outputs

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
        }
        extras = {
            "reduction_axes": list(self.reduction_axes)
            if isinstance(self.reduction_axes, tuple)
            else self.reduction_axes,
            "activation": activation,
            "mean_close_to_zero": self.mean_close_to_zero,
        }
        config.update({k: v for k, v in extras.items() if v != _EXTRAS[k]})
        return {**super().get_config(), **config}


def _is_group_normalization(config: dict[str, Any]) -> bool:
    """Whether a serialized object is Keras's or groupnorm's GroupNormalization."""
    if config.get("class_name") != "GroupNormalization":
        return False
    return config.get("module") == "keras.layers" or config.get("registered_name") == "groupnorm>GroupNormalization"


def _swap_layers(config: Any, identity: dict[str, Any]) -> Any:
    """``config`` (a ``.keras`` file's, parsed) with every GroupNormalization given ``identity``."""
    if isinstance(config, list):
        return [_swap_layers(c, identity) for c in config]
    if not isinstance(config, dict):
        return config
    swapped = {k: _swap_layers(v, identity) for k, v in config.items()}
    if _is_group_normalization(config):
        swapped.update(identity)
    return swapped


def load_model(filepath: str | Path, layer_class: type[Any] | None = None, **kwargs: Any) -> Any:
    """``keras.models.load_model`` for a ``.keras`` file, with every GroupNormalization layer in it,
    Keras's or groupnorm's, loaded as ``layer_class``: groupnorm's :class:`GroupNormalization` (the
    default) or ``keras.layers.GroupNormalization``. Configs and weights are the same for both (for
    Keras's layer, groupnorm's own arguments must be at their defaults).

    Keras resolves its built-in layers before any ``custom_objects``, and registered classes (as
    groupnorm's is, once :mod:`groupnorm.keras` is imported) before them too, so ``custom_objects``
    cannot swap either class for the other; this can. ``kwargs`` go to ``keras.models.load_model``.

    Args:
        filepath: the ``.keras`` file.
        layer_class: the class to load every GroupNormalization layer as (default: groupnorm's).
        kwargs: passed to ``keras.models.load_model``.

    Example::

        >>> model = load_model("model.keras")                                   # doctest: +SKIP
        >>> theirs = load_model("model.keras", keras.layers.GroupNormalization)  # doctest: +SKIP
    """
    serialized = keras.saving.serialize_keras_object((layer_class or GroupNormalization)())
    identity = {key: serialized[key] for key in ("module", "class_name", "registered_name")}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / Path(filepath).name
        with zipfile.ZipFile(filepath) as source, zipfile.ZipFile(copy, "w") as target:
            for item in source.infolist():
                data = source.read(item)
                if item.filename == "config.json":
                    data = json.dumps(_swap_layers(json.loads(data), identity)).encode()
                target.writestr(item, data)
        return keras.models.load_model(copy, **kwargs)
