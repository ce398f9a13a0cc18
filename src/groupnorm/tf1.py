"""``tf.contrib.layers.group_norm`` of TensorFlow 1.15, with its exact signature, for ``tf.compat.v1`` code.

The function creates its variables the way the contrib (and tf-slim) layer did -- ``beta`` and ``gamma``
of shape ``[C]`` in the input's dtype, inside a variable scope named ``scope`` (default ``GroupNorm``),
registered as model variables -- so checkpoints written by models that used that layer restore into a
graph built with this one unchanged. It also works in TF2 code through ``tf_keras``'s
``track_tf1_style_variables`` migration shim. The computation is :mod:`groupnorm.backends.tensorflow`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow as tf

from groupnorm._plan import make_plan, resolve_activation
from groupnorm.backends import tensorflow as backend

__all__ = ["group_norm"]

_PARAMS = ("beta", "gamma")


def _collections(variables_collections: Any, name: str) -> list[str]:
    """Collections for variable ``name``: the model-variable ones plus the user's (list or dict)."""
    extra: Any = variables_collections
    if isinstance(variables_collections, Mapping):
        extra = variables_collections.get(name)
    if extra is None:
        extra = []
    elif isinstance(extra, str):
        extra = [extra]
    result = [tf.compat.v1.GraphKeys.GLOBAL_VARIABLES, tf.compat.v1.GraphKeys.MODEL_VARIABLES]
    for collection in extra:
        if collection not in result:
            result.append(collection)
    return result


def _collect_outputs(outputs: tf.Tensor, collections: Any, alias: str) -> None:
    if not collections:
        return
    if isinstance(collections, str):
        collections = [collections]
    if not tf.executing_eagerly():
        # the contrib layers' convention: the output joins the collections, its `aliases` list gains
        # the layer's scope name
        alias = alias.rstrip("/")
        aliases = getattr(outputs, "aliases", None)
        if aliases is None:
            outputs.aliases = [alias]  # type: ignore[attr-defined]
        else:
            aliases.append(alias)
        tf.compat.v1.add_to_collections(list(collections), outputs)


def group_norm(
    inputs: Any,
    groups: int = 32,
    channels_axis: int = -1,
    reduction_axes: int | Sequence[int] = (-3, -2),
    center: bool = True,
    scale: bool = True,
    epsilon: float = 1e-06,
    activation_fn: Callable[[Any], Any] | str | None = None,
    param_initializers: Mapping[str, Any] | None = None,
    reuse: bool | None = None,
    variables_collections: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    outputs_collections: Sequence[str] | None = None,
    trainable: bool = True,
    scope: str | None = None,
    mean_close_to_zero: bool = False,
) -> tf.Tensor:
    """Group normalization (Wu & He, 2018) with ``tf.contrib.layers.group_norm``'s signature.

    Args:
        inputs: a floating-point tensor (float16/bfloat16/float32/float64) of rank >= 1; every dimension
            but the kept ones (usually the batch) must be static.
        groups: how many groups the channels are divided into; must divide the channel count.
        channels_axis: the channel axis (negative counts from the end).
        reduction_axes: axes statistics run over besides the group's channels.
        center: create ``beta`` and add it.
        scale: create ``gamma`` and multiply by it.
        epsilon: added to the variance.
        activation_fn: ``None``, a callable applied to the output, or ``"relu"``/``"silu"``/``"gelu"``.
        param_initializers: initializers keyed by ``"beta"`` and ``"gamma"``.
        reuse: reuse the variables of ``scope``.
        variables_collections: extra collections for the variables: a list for both, or a dict keyed
            by ``"beta"``/``"gamma"``.
        outputs_collections: collections the output is added to (with the scope's name as ``alias``).
        trainable: add the variables to ``TRAINABLE_VARIABLES``.
        scope: the variable scope; ``GroupNorm`` (uniquified) by default.
        mean_close_to_zero: ``True`` for one-pass statistics (faster; clamped so never NaN), ``False``
            for the numerically stable variance.

    Returns:
        The normalized tensor, with the input's shape and dtype.

    Example::

        >>> import tensorflow.compat.v1 as tf
        >>> tf.disable_eager_execution()
        >>> x = tf.placeholder(tf.float32, [None, 8, 8, 64])                # NHWC, batch unknown
        >>> y = group_norm(x, groups=32, scope="gn1")                       # creates gn1/beta, gn1/gamma
        >>> sorted(v.op.name for v in tf.global_variables())
        ['gn1/beta', 'gn1/gamma']
    """
    inputs = tf.convert_to_tensor(inputs)
    plan = make_plan(
        backend.static_shape(inputs),
        backend.dtype_name(inputs),
        groups=groups,
        channels_axis=channels_axis,
        reduction_axes=reduction_axes,
        epsilon=epsilon,
        mean_close_to_zero=mean_close_to_zero,
    )
    activation = resolve_activation(activation_fn)
    initializers = dict(param_initializers or {})
    unknown = sorted(set(initializers) - set(_PARAMS))
    if unknown:
        raise ValueError(f"param_initializers takes the keys 'beta' and 'gamma' only; got {unknown}.")
    dtype = inputs.dtype.base_dtype
    defaults = {"beta": tf.compat.v1.zeros_initializer(), "gamma": tf.compat.v1.ones_initializer()}
    with tf.compat.v1.variable_scope(scope, "GroupNorm", [inputs], reuse=reuse) as sc:
        params: dict[str, Any] = {}
        for name, wanted in (("beta", center), ("gamma", scale)):
            if wanted:
                params[name] = tf.compat.v1.get_variable(
                    name,
                    shape=[plan.channels],
                    dtype=dtype,
                    initializer=initializers.get(name, defaults[name]),
                    trainable=trainable,
                    collections=_collections(variables_collections, name),
                )
        outputs = backend.execute(plan, inputs, params.get("gamma"), params.get("beta"), activation)
        _collect_outputs(outputs, outputs_collections, sc.name)
        return outputs
