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
from groupnorm.keras import ArgumentError, GroupNormalization, load_model
from masked_support import masked_reference, masked_reference_grads
from support import Config, hard_data, reference_group_norm

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


#: Keras's arguments, set to other than their defaults (a few at a time)
KERAS_KWARGS: list[dict[str, Any]] = [
    {},
    {"groups": 4, "axis": 1, "epsilon": 1e-5, "center": False},
    {"groups": -1, "scale": False, "gamma_regularizer": "l2", "beta_constraint": "non_neg"},
    {"groups": True, "beta_initializer": "random_normal", "gamma_constraint": "unit_norm", "trainable": False},
    {"groups": 2, "dtype": "mixed_float16"},
]


@pytest.mark.parametrize("kwargs", KERAS_KWARGS)
def test_default_config_equals_keras_layers_and_each_loads_the_other(kwargs: dict[str, Any]) -> None:
    ours = GroupNormalization(name="gn", **kwargs)
    theirs = keras.layers.GroupNormalization(name="gn", **kwargs)
    assert ours.get_config() == theirs.get_config()
    assert keras.layers.GroupNormalization.from_config(ours.get_config()).get_config() == theirs.get_config()
    assert GroupNormalization.from_config(theirs.get_config()).get_config() == ours.get_config()


@pytest.mark.parametrize(
    ("extra", "value", "stored"),
    [
        ("reduction_axes", (1,), [1]),
        ("reduction_axes", (), []),
        ("reduction_axes", 2, 2),
        ("activation", "silu", "silu"),
        ("activation", "tanh", "tanh"),
        ("mean_close_to_zero", True, True),
    ],
)
def test_own_arguments_appear_in_config_only_when_set(extra: str, value: Any, stored: Any) -> None:
    config = GroupNormalization(groups=4, name="gn", **{extra: value}).get_config()
    base = keras.layers.GroupNormalization(groups=4, name="gn").get_config()
    assert {k: v for k, v in config.items() if k != extra} == base
    assert config[extra] == stored
    assert GroupNormalization.from_config(config).get_config() == config


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
    swapped = load_model(str(tmp_path / "m.keras"))
    assert [type(la) for la in swapped.layers if "group" in la.name] == [GroupNormalization] * 2
    np.testing.assert_allclose(swapped.predict(x, verbose=0), theirs.predict(x, verbose=0), atol=1e-5)
    # without load_model, Keras resolves its built-in layer first, whatever custom_objects say
    plain = keras.models.load_model(
        str(tmp_path / "m.keras"), custom_objects={"GroupNormalization": GroupNormalization}
    )
    assert type(plain.layers[2]) is keras.layers.GroupNormalization


def test_keras_layer_loads_weights_and_models_saved_with_ours(tmp_path: Path) -> None:
    keras.utils.set_random_seed(2)
    ours = _model(GroupNormalization)
    ours.save_weights(str(tmp_path / "m.weights.h5"))
    ours.save(str(tmp_path / "m.keras"))
    theirs = _model(keras.layers.GroupNormalization)
    theirs.load_weights(str(tmp_path / "m.weights.h5"))
    x = hard_data((2, 6, 6, 3), -1, 1.0)
    np.testing.assert_allclose(theirs.predict(x, verbose=0), ours.predict(x, verbose=0), atol=1e-5)
    loaded = load_model(str(tmp_path / "m.keras"), keras.layers.GroupNormalization)
    assert [type(la) for la in loaded.layers if "group" in la.name] == [keras.layers.GroupNormalization] * 2
    np.testing.assert_allclose(loaded.predict(x, verbose=0), ours.predict(x, verbose=0), atol=1e-5)


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


def test_keras_mask_of_timesteps_is_used_for_the_statistics(tmp_path: Path) -> None:
    """A Masking layer's mask (batch, time) reaches call(); statistics skip the masked timesteps; so
    too after saving and loading the model."""
    x = hard_data((3, 6, 8), -1, 2.0, seed=1)
    x[0, 4:] = 0.0  # padding: Masking(0.0) masks these timesteps
    x[2, 1] = 0.0
    model = keras.Sequential([keras.Input((6, 8)), keras.layers.Masking(0.0), GroupNormalization(groups=2)])
    mask = np.any(x != 0.0, axis=-1)
    cfg = Config((3, 6, 8), 2, -1, (1,), epsilon=1e-3)
    want = masked_reference(cfg, x, mask[..., None])["y"]
    np.testing.assert_allclose(model(x).numpy(), want, atol=2e-5)
    unmasked = reference_group_norm(x, 2, -1, (1,), epsilon=1e-3)
    assert np.abs(want - unmasked).max() > 0.1  # the mask matters here
    model.save(str(tmp_path / "m.keras"))
    np.testing.assert_allclose(keras.models.load_model(str(tmp_path / "m.keras"))(x).numpy(), want, atol=2e-5)


@pytest.mark.parametrize(
    ("shape", "kwargs", "mask_shape", "axes", "insert"),
    [
        ((2, 4, 5, 8), {"groups": 4}, (2, 4, 5, 8), (1, 2), None),  # full
        ((2, 4, 5, 8), {"groups": 4}, (2, 4, 5), (1, 2), -1),  # one rank less: per position
        ((2, 8, 6), {"groups": 2, "axis": 1}, (2, 6), (2,), 1),  # channels first: inserted at axis
        ((2, 4, 5, 8), {"groups": 2, "activation": "gelu", "reduction_axes": (2,)}, (1, 4, 5, 1), (2,), None),
    ],
)
def test_mask_in_call_against_reference_with_gradients(
    shape: tuple[int, ...], kwargs: dict[str, Any], mask_shape: tuple[int, ...], axes: tuple[int, ...], insert: Any
) -> None:
    layer = GroupNormalization(
        epsilon=1e-5, gamma_initializer="random_normal", beta_initializer="random_normal", **kwargs
    )
    x = tf.constant(hard_data(shape, kwargs.get("axis", -1), 1e3, seed=2))
    mask = np.random.default_rng(3).random(mask_shape) < 0.6
    cot = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, mask=tf.constant(mask))
        loss = tf.reduce_sum(y * cot)
    dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
    full = mask if insert is None else np.expand_dims(mask, insert)
    cfg = Config(
        shape, kwargs["groups"], kwargs.get("axis", -1), axes, epsilon=1e-5, activation=kwargs.get("activation")
    )
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    np.testing.assert_allclose(y.numpy(), masked_reference(cfg, x.numpy(), full, gamma, beta)["y"], atol=2e-5)
    want = masked_reference_grads(cfg, x.numpy(), full, cot, gamma, beta)
    for got, ref in ((dx, want["x"]), (dgamma, want["gamma"]), (dbeta, want["beta"])):
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-4 * max(1.0, np.abs(ref).max()))


def test_mask_in_tf_function_with_dynamic_batch_and_errors() -> None:
    layer = GroupNormalization(groups=2, epsilon=1e-5)
    layer.build((None, 5, 4))
    fn = tf.function(layer.call, input_signature=[tf.TensorSpec([None, 5, 4]), tf.TensorSpec([None, 5], tf.bool)])
    x = hard_data((3, 5, 4), -1, 1.0, seed=5)
    mask = np.random.default_rng(6).random((3, 5)) < 0.7
    cfg = Config((3, 5, 4), 2, -1, (1,), epsilon=1e-5)
    np.testing.assert_allclose(fn(x, mask).numpy(), masked_reference(cfg, x, mask[..., None])["y"], atol=2e-5)
    with pytest.raises(ValueError, match="must be None or a boolean array"):
        layer(x, mask=np.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match="does not broadcast"):
        layer(x, mask=np.ones((3, 4, 4), bool))


@pytest.mark.parametrize(
    ("shape", "kwargs", "error", "match"),
    [
        ((None, 4, 4, 8), {"groups": 3}, ValueError, "8 channels is not commensurate with 3 groups."),
        ((None, 4, 4, 8), {"groups": 3}, ValueError, r"Number of groups \(3\) must be a multiple of the number"),
        ((None, 4, 4, 8), {"groups": 16}, ValueError, "Invalid groups 16 for 8 channels."),
        ((None, 4, 4, 8), {"groups": 16}, ValueError, r"\(16\) cannot be more than the number of channels \(8\)"),
        ((None, 4, 4, None), {"groups": 2}, ValueError, "undefined channel dimension"),
        (
            (None, 4, 4, None),
            {"groups": 2},
            ValueError,
            r"Axis -1 of input tensor should have a defined dimension but the layer received an input with shape",
        ),
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
        ({"epsilon": -1e-3}, ValueError, "epsilon"),
        ({"mean_close_to_zero": "yes"}, TypeError, "mean_close_to_zero"),
    ],
)
def test_argument_errors_at_construction(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        GroupNormalization(**kwargs)


@pytest.mark.parametrize("groups", [0, -2, 1.5, 2.0, "32", None, [4]])
def test_invalid_groups_raise_value_error_as_keras_does(groups: Any) -> None:
    """Keras raises ValueError ("argument `groups`") for these; so does groupnorm, with the plan's
    reason, and the class is a TypeError too (as the plan's error for a non-int is)."""
    with pytest.raises(ValueError, match="argument `groups`"):
        keras.layers.GroupNormalization(groups=groups)
    with pytest.raises(ArgumentError, match=r"argument `groups`.*groups must be a positive int") as info:
        GroupNormalization(groups=groups)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_groups_true_is_one_group_as_in_keras() -> None:
    x = hard_data((2, 4, 6), -1, 2.0)
    ours, theirs = GroupNormalization(groups=True), keras.layers.GroupNormalization(groups=True)
    np.testing.assert_allclose(ours(x).numpy(), theirs(x).numpy(), atol=2e-5)
    np.testing.assert_allclose(ours(x).numpy(), reference_group_norm(x, 1, -1, (1,), epsilon=1e-3), atol=2e-5)
    assert ours.get_config()["groups"] is True
