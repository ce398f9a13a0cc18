"""groupnorm.keras.GroupNormalization on the TensorFlow Keras backend: a drop-in for
keras.layers.GroupNormalization (differential tests, weights, config, saving), plus its own arguments,
against the float64 reference. Other Keras backends: test_keras_backends.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from groupnorm.backends import keras as keras_backend
from groupnorm.keras import GroupNormalization
from support import hard_data, reference_group_norm

assert keras.backend.backend() == "tensorflow"

#: (input shape without batch, layer kwargs): configurations where Keras's layer and ours coincide.
SHARED_CONFIGS: list[tuple[tuple[int, ...], dict[str, Any]]] = [
    ((4, 5, 8), {"groups": 4}),
    ((4, 5, 8), {"groups": 2, "epsilon": 1e-5, "center": False}),
    ((8, 3, 3), {"groups": 4, "axis": 1, "scale": False}),
    ((6,), {"groups": 3}),
    ((5, 6), {"groups": -1}),
    ((3, 2, 2, 4), {"groups": 1, "axis": -1, "epsilon": 0.1}),
    ((4, 6, 2), {"groups": 3, "axis": -2, "gamma_initializer": "random_normal", "beta_initializer": "random_normal"}),
]


def _pair(kwargs: dict[str, Any], shape: tuple[int, ...]) -> tuple[keras.layers.Layer, keras.layers.Layer]:
    ours, theirs = GroupNormalization(**kwargs), keras.layers.GroupNormalization(**kwargs)
    ours.build((None, *shape))
    theirs.build((None, *shape))
    theirs.set_weights(ours.get_weights())
    return ours, theirs


@pytest.mark.parametrize(("shape", "kwargs"), SHARED_CONFIGS)
def test_matches_keras_layer_values_and_gradients(shape: tuple[int, ...], kwargs: dict[str, Any]) -> None:
    ours, theirs = _pair(kwargs, shape)
    x = tf.constant(hard_data((3, *shape), kwargs.get("axis", -1), 0.5))
    cot = tf.constant(np.random.default_rng(0).standard_normal((3, *shape)).astype(np.float32))
    results = []
    for layer in (ours, theirs):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * cot)
        grads = tape.gradient(loss, [x, *layer.trainable_variables])
        results.append((y.numpy(), [g.numpy() for g in grads]))
    (y_ours, g_ours), (y_theirs, g_theirs) = results
    np.testing.assert_allclose(y_ours, y_theirs, rtol=0, atol=2e-5)
    for a, b in zip(g_ours, g_theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-4 * max(1.0, np.abs(b).max()))
    assert ours.get_config()["groups"] == theirs.get_config()["groups"]


def test_accepts_every_argument_of_keras_layer_with_same_defaults() -> None:
    import inspect

    theirs = inspect.signature(keras.layers.GroupNormalization.__init__).parameters
    ours = inspect.signature(GroupNormalization.__init__).parameters
    for name, param in theirs.items():
        assert name in ours, name
        assert ours[name].default == param.default, name
    config = GroupNormalization().get_config()
    assert set(keras.layers.GroupNormalization().get_config()) <= set(config)


@pytest.mark.parametrize(
    ("shape", "kwargs", "axes", "activation"),
    [
        ((2, 3, 4, 4, 6), {"groups": 3, "reduction_axes": (-3, -2)}, (-3, -2), None),  # video: time kept
        ((2, 4, 5, 8), {"groups": 4, "activation": "gelu"}, (1, 2), "gelu"),
        ((2, 4, 5, 8), {"groups": 2, "activation": "relu", "mean_close_to_zero": True}, (1, 2), "relu"),
        ((2, 8, 4, 5), {"groups": 4, "axis": 1, "activation": "silu", "reduction_axes": (2, 3)}, (2, 3), "silu"),
        ((2, 4, 5, 8), {"groups": 4, "reduction_axes": ()}, (), None),
    ],
)
def test_own_arguments_against_reference(
    shape: tuple[int, ...], kwargs: dict[str, Any], axes: tuple[int, ...], activation: str | None
) -> None:
    x = hard_data(shape, kwargs.get("axis", -1), 3.0)
    y = GroupNormalization(epsilon=1e-5, **kwargs)(x)
    ref = reference_group_norm(x, kwargs["groups"], kwargs.get("axis", -1), axes, epsilon=1e-5, activation=activation)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(y), ref, atol=2e-5)


def test_keras_activation_by_name() -> None:
    x = hard_data((2, 4, 4, 8), -1, 1.0)
    y = GroupNormalization(groups=4, activation="tanh")(x)
    np.testing.assert_allclose(y.numpy(), np.tanh(reference_group_norm(x, 4, epsilon=1e-3)), atol=1e-5)
    restored = GroupNormalization.from_config(GroupNormalization(groups=4, activation="tanh").get_config())
    np.testing.assert_allclose(restored(x).numpy(), y.numpy(), atol=1e-6)


@pytest.fixture
def portable() -> Iterator[None]:
    """Run the layer through keras.ops even on TensorFlow."""
    saved = keras_backend.execute
    keras_backend.execute = lambda *a, **k: saved(*a, **k, portable=True)  # type: ignore[assignment]
    yield
    keras_backend.execute = saved  # type: ignore[assignment]


@pytest.mark.parametrize("path", ["native", "portable"])
def test_large_mean_accuracy_in_tf_function(path: str, request: pytest.FixtureRequest) -> None:
    if path == "portable":
        request.getfixturevalue("portable")
    layer = GroupNormalization(groups=4, epsilon=1e-5)
    layer.build((None, 4, 4, 8))
    x = hard_data((3, 4, 4, 8), -1, 1e4)
    fn = tf.function(layer, input_signature=[tf.TensorSpec([None, 4, 4, 8], tf.float32)])
    ref = reference_group_norm(x, 4, epsilon=1e-5)
    assert np.abs(fn(tf.constant(x)).numpy() - ref).max() <= 1e-5
    assert np.abs(layer(x).numpy() - ref).max() <= 1e-5


def test_portable_path_matches_reference_with_params(portable: None) -> None:
    layer = GroupNormalization(groups=2, axis=1, gamma_initializer="random_normal", beta_initializer="random_normal")
    x = hard_data((2, 4, 3, 3), 1, 2.0)
    y = layer(x).numpy()
    gamma, beta = (w.numpy() for w in (layer.gamma, layer.beta))
    np.testing.assert_allclose(y, reference_group_norm(x, 2, 1, (2, 3), gamma, beta, 1e-3), atol=2e-5)


def test_config_round_trip() -> None:
    layer = GroupNormalization(
        groups=4,
        axis=1,
        epsilon=1e-4,
        reduction_axes=(2,),
        activation="silu",
        mean_close_to_zero=True,
        gamma_regularizer="l2",
        beta_constraint="non_neg",
        name="gn",
    )
    config = layer.get_config()
    clone = GroupNormalization.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, GroupNormalization)
    assert restored.get_config() == config


def _model(layer_cls: Any) -> keras.Model:
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    h = layer_cls(groups=4)(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.Conv2D(4, 3, padding="same")(h)
    h = layer_cls(groups=2, gamma_initializer="random_normal", beta_initializer="random_normal")(h)
    return keras.Model(inputs, h)


def test_drop_in_loads_weights_saved_with_keras_layer(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    theirs = _model(keras.layers.GroupNormalization)
    theirs.save_weights(str(tmp_path / "m.weights.h5"))
    theirs.save(str(tmp_path / "m.keras"))
    ours = _model(GroupNormalization)
    assert [w.path.split("/")[-1] for w in ours.weights] == [w.path.split("/")[-1] for w in theirs.weights]
    ours.load_weights(str(tmp_path / "m.weights.h5"))
    x = hard_data((2, 6, 6, 3), -1, 1.0)
    np.testing.assert_allclose(ours.predict(x, verbose=0), theirs.predict(x, verbose=0), atol=1e-5)
    # a whole .keras model saved with Keras's layer loads with ours swapped in
    swapped = keras.models.load_model(
        str(tmp_path / "m.keras"), custom_objects={"GroupNormalization": GroupNormalization}
    )
    np.testing.assert_allclose(swapped.predict(x, verbose=0), theirs.predict(x, verbose=0), atol=1e-5)


def test_model_save_and_load_round_trip(tmp_path: Path) -> None:
    inputs = keras.Input((4, 4, 8))
    outputs = GroupNormalization(groups=4, activation="gelu", reduction_axes=(1, 2), gamma_initializer="random_normal")(
        inputs
    )
    model = keras.Model(inputs, outputs)
    path = str(tmp_path / "x.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.layers[-1], GroupNormalization)
    x = hard_data((3, 4, 4, 8), -1, 5.0)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_trains_with_fit_and_jit() -> None:
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4, 4, 8)), GroupNormalization(groups=4), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    x = hard_data((8, 4, 4, 8), -1, 1.0)
    before = [w.numpy().copy() for w in model.layers[0].weights]
    history = model.fit(x, np.ones((8, 4, 4, 1)), epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert all(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.layers[0].weights, strict=True))


def test_mixed_float16_large_activations() -> None:
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = GroupNormalization(groups=4, epsilon=1e-5)
        x = hard_data((2, 4, 4, 8), -1, 3.0, std=400.0)  # values around 1200: squares overflow float16
        x16 = tf.constant(x, tf.float16)
        y = layer(x16)
        y_from_f32 = layer(tf.constant(x))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert layer.gamma.dtype == "float32"
    assert y.dtype == tf.float16
    ref = reference_group_norm(tf.cast(x16, tf.float64).numpy(), 4, epsilon=1e-5)
    out = tf.cast(y, tf.float64).numpy()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=5e-3)
    np.testing.assert_allclose(
        tf.cast(y_from_f32, tf.float64).numpy(), reference_group_norm(x, 4, epsilon=1e-5), atol=5e-3
    )


def test_masking_passes_through() -> None:
    inputs = keras.Input((5, 8))
    masked = keras.layers.Masking(0.0)(inputs)
    normed = GroupNormalization(groups=2)(masked)
    assert normed._keras_mask is not None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("shape", "kwargs", "error", "match"),
    [
        ((None, 4, 4, 8), {"groups": 3}, ValueError, "8 channels is not commensurate with 3 groups."),
        ((None, 4, 4, 8), {"groups": 16}, ValueError, "Invalid groups 16 for 8 channels."),
        ((None, 4, 4, None), {"groups": 2}, ValueError, "undefined channel dimension"),
        ((None, 4, 4, 8), {"axis": 4}, ValueError, "Axis is out of bounds."),
        ((None, 4, 4, 8), {"groups": 2, "reduction_axes": (0,)}, ValueError, "undefined dimensions"),
        ((None, 4, 4, 8), {"groups": 2, "reduction_axes": (3,)}, ValueError, "mutually exclusive"),
    ],
)
def test_contract_errors_at_build(
    shape: tuple[int | None, ...], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        GroupNormalization(**kwargs).build(shape)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"groups": 0}, ValueError, "groups must be a positive int"),
        ({"groups": -2}, ValueError, "groups must be a positive int"),
        ({"groups": 2.0}, TypeError, "groups must be a positive int"),
        ({"epsilon": -1e-3}, ValueError, "epsilon"),
        ({"mean_close_to_zero": "yes"}, TypeError, "mean_close_to_zero"),
    ],
)
def test_argument_errors_at_construction(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        GroupNormalization(**kwargs)
