"""Keras candidates: ``groupnorm.keras.GroupNormalization`` against ``keras.layers.GroupNormalization``
(followed by the activation, where one is asked), both called inside a ``tf.function`` on the TensorFlow
backend; ``x * s`` in a ``tf.function`` is the floor. float16 input runs under the ``mixed_float16`` policy.

TensorFlow's eager CPU execution is synchronous: a ``tf.function`` call returns once its outputs are
computed. To be sure, each timed call also reads one element of the result back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from groupnorm.bench._core import Array, Candidate, Data, Parts, guard

FRAMEWORK = "keras"


def _keras() -> Any:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(f"needs the TensorFlow Keras backend, this process has {keras.backend.backend()!r}")
    return keras


def _policy(dtype: str) -> str:
    return "mixed_float16" if dtype == "float16" else dtype


def build(data: Data) -> list[Candidate]:
    spec = data.spec
    axis = 1 if spec.layout == "NCHW" else -1

    def parts(make_layer: Callable[[Any], Any]) -> Parts:
        keras = _keras()
        import tensorflow as tf

        layer = make_layer(keras)
        x = tf.constant(data.x)
        dy = tf.constant(data.cotangent)
        layer.build(x.shape)
        first = (0,) * spec.rank

        @tf.function(autograph=False)  # type: ignore[untyped-decorator]
        def fwd(x: Any) -> Any:
            y = layer(x)
            return y, y[first]

        @tf.function(autograph=False)  # type: ignore[untyped-decorator]
        def step(x: Any, dy: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
                loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.cast(dy, tf.float32))
            grads = tape.gradient(loss, [x, *layer.trainable_variables])
            return grads, grads[0][first]

        def forward() -> object:
            return fwd(x)[1].numpy()

        def train() -> object:
            return step(x, dy)[1].numpy()

        def output() -> Array:
            return fwd(x)[0].numpy()  # type: ignore[no-any-return]

        return forward, train, output

    def groupnorm_layer(keras: Any) -> Any:
        from groupnorm.keras import GroupNormalization

        return GroupNormalization(
            groups=spec.groups, axis=axis, epsilon=spec.epsilon, activation=spec.activation, dtype=_policy(spec.dtype)
        )

    def keras_layer(keras: Any) -> Any:
        norm = keras.layers.GroupNormalization(
            groups=spec.groups, axis=axis, epsilon=spec.epsilon, dtype=_policy(spec.dtype)
        )
        if spec.activation is None:
            return norm
        act = keras.layers.Activation(spec.activation, dtype=_policy(spec.dtype))
        return keras.Sequential([norm, act])

    def floor_parts() -> Parts:
        import tensorflow as tf

        x = tf.constant(data.x)
        first = (0,) * spec.rank

        @tf.function(autograph=False)  # type: ignore[untyped-decorator]
        def scale(x: Any) -> Any:
            y = x * tf.constant(1.0001, x.dtype)
            return y, y[first]

        return (lambda: scale(x)[1].numpy()), None, None

    act = f" + {spec.activation}" if spec.activation else ""
    return [
        guard("groupnorm.keras.GroupNormalization", "groupnorm", "", spec.layout, lambda: parts(groupnorm_layer)),
        guard(f"keras.layers.GroupNormalization{act}", "peer", "", spec.layout, lambda: parts(keras_layer)),
        guard("x * s (tf.function)", "floor", "", spec.layout, floor_parts),
    ]


def configure(threads: int) -> None:
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # the eager runtime has started: it keeps its threads
        pass
