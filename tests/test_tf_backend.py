"""groupnorm.group_norm on tf.Tensor / tf.Variable: values, gradients, tf.function, XLA, dtypes,
SavedModel, and the contract's errors, against the float64 reference."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings

import groupnorm
from groupnorm.backends import tensorflow as tfb
from support import NAMED_CONFIGS, Config, configs, hard_data, reference_group_norm
from tf_support import reference_grads, scaled_tolerance


def run(cfg: Config, arrays: dict[str, Any], dtype: tf.DType = tf.float32) -> tuple[np.ndarray, list[np.ndarray]]:
    """Output and gradients (input, then gamma and beta where given) of ``sum(y * cotangent)``."""
    x = tf.constant(arrays["x"], dtype)
    params = [tf.Variable(arrays[k], dtype=dtype) if arrays[k] is not None else None for k in ("gamma", "beta")]
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = groupnorm.group_norm(x, gamma=params[0], beta=params[1], **cfg.kwargs())
        loss = tf.reduce_sum(tf.cast(y, tf.float64) * arrays["cotangent"])
    sources = [x, *(p for p in params if p is not None)]
    grads = tape.gradient(loss, sources)
    assert y.dtype == dtype
    assert y.shape == x.shape
    return y.numpy(), [g.numpy() for g in grads]


def check(cfg: Config, dtype: tf.DType = tf.float32, rel: float = 2e-5) -> None:
    arrays = cfg.arrays(np.float64)
    y, grads = run(cfg, arrays, dtype)
    ref = cfg.reference(arrays["x"], arrays["gamma"], arrays["beta"])
    np.testing.assert_allclose(y, ref, rtol=0, atol=scaled_tolerance(ref, rel), err_msg=str(cfg))
    expected = reference_grads(cfg, arrays)
    wanted = [expected.inputs, *(g for g in (expected.gamma, expected.beta) if g is not None)]
    assert len(grads) == len(wanted)
    for got, want in zip(grads, wanted, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=scaled_tolerance(want, 10 * rel), err_msg=str(cfg))


@pytest.fixture(params=[True, False], ids=["xla", "no-xla"])
def jit(request: pytest.FixtureRequest) -> Iterator[bool]:
    saved = tfb.JIT_COMPILE
    tfb.JIT_COMPILE = request.param
    yield request.param
    tfb.JIT_COMPILE = saved


@pytest.mark.parametrize("name", sorted(NAMED_CONFIGS))
def test_named_configs_values_and_gradients(name: str, jit: bool) -> None:
    check(NAMED_CONFIGS[name])


@pytest.mark.parametrize("name", ["nhwc", "5d-ncdhw", "silu"])
def test_float64_is_exact(name: str) -> None:
    check(NAMED_CONFIGS[name], tf.float64, rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(configs())
def test_random_configs_values_and_gradients(cfg: Config) -> None:
    check(cfg, tf.float64, rel=1e-9)
    if not cfg.mean_close_to_zero:  # one-pass float32 statistics are inexact by design
        check(cfg)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_large_mean_float32_accuracy_on_every_path(layout: str) -> None:
    cfg = NAMED_CONFIGS[layout]
    x = hard_data(cfg.shape, cfg.channels_axis, 1e4)
    ref = reference_group_norm(x, cfg.groups, cfg.channels_axis, cfg.reduction_axes, epsilon=cfg.epsilon)
    kwargs = {k: v for k, v in cfg.kwargs().items() if k != "activation_fn"}

    def gn(t: tf.Tensor) -> tf.Tensor:
        return groupnorm.group_norm(t, **kwargs)

    spec = tf.TensorSpec([None, *cfg.shape[1:]], tf.float32)
    paths = {
        "eager": gn,
        "tf.function": tf.function(gn, input_signature=[spec]),
        "jit_compile": tf.function(gn, input_signature=[spec], jit_compile=True),
    }
    for path, fn in paths.items():
        y = fn(tf.constant(x)).numpy()
        assert np.abs(y - ref).max() <= 1e-5, path


def test_mean_close_to_zero_never_nan_at_large_mean() -> None:
    x = hard_data((2, 4, 4, 8), -1, 1e5)
    y = groupnorm.group_norm(tf.constant(x), groups=2, mean_close_to_zero=True).numpy()
    assert np.isfinite(y).all()


@pytest.mark.parametrize(("dtype", "atol"), [(tf.float16, 2e-2), (tf.bfloat16, 8e-2)])
def test_half_precision_uses_float32_statistics(dtype: tf.DType, atol: float) -> None:
    # values up to ~6e4: squares overflow float16, so statistics must be float32
    x = hard_data((2, 4, 4, 8), -1, 3.0, std=1.5e4)
    x = np.clip(x, -6e4, 6e4)
    xt = tf.cast(tf.constant(x), dtype)
    x_rounded = tf.cast(xt, tf.float64).numpy()
    gamma = tf.cast(tf.constant(np.linspace(0.5, 1.5, 8)), dtype)
    y = groupnorm.group_norm(xt, groups=4, gamma=gamma, epsilon=1e-5)
    assert y.dtype == dtype
    ref = reference_group_norm(x_rounded, 4, gamma=tf.cast(gamma, tf.float64).numpy(), epsilon=1e-5)
    out = tf.cast(y, tf.float64).numpy()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=0, atol=atol)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(tf.cast(groupnorm.group_norm(xt, groups=4), tf.float32))
    assert np.isfinite(tf.cast(tape.gradient(loss, xt), tf.float32).numpy()).all()


def test_tf_function_dynamic_batch_does_not_retrace() -> None:
    cfg = NAMED_CONFIGS["nchw"]

    @tf.function(input_signature=[tf.TensorSpec([None, *cfg.shape[1:]], tf.float32)])
    def f(x: tf.Tensor) -> tf.Tensor:
        y = groupnorm.group_norm(x, groups=cfg.groups, channels_axis=-3, reduction_axes=(-2, -1))
        assert y.shape.as_list() == [None, *cfg.shape[1:]]
        return y

    for batch in (1, 3, 2, 5):
        x = hard_data((batch, *cfg.shape[1:]), 1, 2.0)
        np.testing.assert_allclose(f(tf.constant(x)).numpy(), reference_group_norm(x, 4, 1, (2, 3)), atol=2e-5)
    assert f.experimental_get_tracing_count() == 1


def test_gradients_inside_jit_compiled_function() -> None:
    cfg = NAMED_CONFIGS["silu"]
    a = cfg.arrays(np.float32)
    gamma, beta = tf.Variable(a["gamma"]), tf.Variable(a["beta"])

    @tf.function(jit_compile=True)
    def step(x: tf.Tensor) -> list[tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = groupnorm.group_norm(x, gamma=gamma, beta=beta, **cfg.kwargs())
            loss = tf.reduce_sum(y * a["cotangent"])
        return tape.gradient(loss, [x, gamma, beta])  # type: ignore[no-any-return]

    got = step(tf.constant(a["x"]))
    want = reference_grads(cfg, a)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.numpy(), w, atol=1e-4)


def test_variable_input_and_callable_activation() -> None:
    cfg = NAMED_CONFIGS["nhwc"]
    a = cfg.arrays(np.float32)
    x = tf.Variable(a["x"])
    with tf.GradientTape() as tape:
        y = groupnorm.group_norm(x, groups=4, activation_fn=tf.tanh)
        loss = tf.reduce_sum(y * a["cotangent"])
    dx = tape.gradient(loss, x).numpy()
    ref = np.tanh(reference_group_norm(a["x"], 4))
    np.testing.assert_allclose(y.numpy(), ref, atol=2e-6)
    # chain rule through the callable, reference from the float64 vjp
    expected = groupnorm.numpy.vjp(a["x"].astype(np.float64), a["cotangent"] * (1 - ref**2), groups=4)
    np.testing.assert_allclose(dx, expected.inputs, atol=1e-4)
    np.testing.assert_array_equal(x.numpy(), a["x"])  # input untouched


def test_empty_batch() -> None:
    y = groupnorm.group_norm(tf.zeros([0, 3, 3, 8]), groups=4)
    assert y.shape == (0, 3, 3, 8)


def test_saved_model_round_trip(tmp_path: Path) -> None:
    class Norm(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gamma = tf.Variable(np.linspace(0.5, 2.0, 8).astype(np.float32))
            self.beta = tf.Variable(np.linspace(-1.0, 1.0, 8).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 4, 5, 8], tf.float32)])
        def __call__(self, x: tf.Tensor) -> tf.Tensor:
            return groupnorm.group_norm(x, groups=4, gamma=self.gamma, beta=self.beta, activation_fn="gelu")

    module = Norm()
    x = hard_data((3, 4, 5, 8), -1, 100.0)
    expected = module(tf.constant(x)).numpy()
    tf.saved_model.save(module, str(tmp_path / "norm"))
    loaded = tf.saved_model.load(str(tmp_path / "norm"))
    np.testing.assert_array_equal(loaded(tf.constant(x)).numpy(), expected)
    ref = reference_group_norm(x, 4, gamma=module.gamma.numpy(), beta=module.beta.numpy(), activation="gelu")
    np.testing.assert_allclose(loaded(tf.constant(x[:1])).numpy(), ref[:1], atol=1e-5)


ERRORS: list[tuple[tuple[int | None, ...] | None, dict[str, Any], type[Exception], str]] = [
    (None, {}, ValueError, "undefined rank"),
    ((2, 4, 4, 8), {"channels_axis": 4}, ValueError, "Axis is out of bounds."),
    ((2, 4, 4, 8), {"reduction_axes": (1, 4)}, ValueError, "Axis is out of bounds."),
    ((2, 4, 4, None), {"groups": 2}, ValueError, "undefined channel dimension"),
    ((2, None, 4, 8), {"groups": 2}, ValueError, "undefined dimensions"),
    ((2, 4, 4, 8), {"groups": 2, "reduction_axes": (-1, 1)}, ValueError, "mutually exclusive"),
    ((2, 4, 4, 8), {"groups": 16}, ValueError, "Invalid groups 16 for 8 channels."),
    ((2, 4, 4, 8), {"groups": 3}, ValueError, "8 channels is not commensurate with 3 groups."),
    ((2, 4, 4, 8), {"groups": 0}, ValueError, "groups must be a positive int"),
    ((2, 4, 4, 8), {"groups": True}, TypeError, "groups must be a positive int"),
    ((2, 4, 4, 8), {"groups": 2, "reduction_axes": (1, -3)}, ValueError, "same axis twice"),
    ((2, 4, 4, 8), {"groups": 2, "epsilon": -1.0}, ValueError, "epsilon"),
    ((2, 4, 4, 8), {"groups": 2, "gamma": tf.ones([4])}, ValueError, "gamma must have shape"),
    ((2, 4, 4, 8), {"groups": 2, "beta": tf.ones([8, 1])}, ValueError, "beta must have shape"),
    ((2, 4, 4, 8), {"groups": 2, "activation_fn": "tanhh"}, ValueError, "Unknown activation"),
    ((2, 4, 4, 8), {"groups": 2, "channels_axis": 1.0}, TypeError, "must be an int"),
]


@pytest.mark.parametrize(("shape", "kwargs", "error", "match"), ERRORS)
def test_contract_errors_for_tf_tensors(
    shape: tuple[int | None, ...] | None, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    calls: list[str] = []

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32)])
    def f(x: tf.Tensor) -> tf.Tensor:
        calls.append("traced")
        return groupnorm.group_norm(x, **kwargs)

    with pytest.raises(error, match=match):
        f.get_concrete_function()
    assert calls == ["traced"]
    if shape is not None and None not in shape:
        with pytest.raises(error, match=match):
            groupnorm.group_norm(tf.zeros(shape), **kwargs)


def test_non_floating_input_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        groupnorm.group_norm(tf.zeros([2, 4, 4, 8], tf.int32), groups=2)


@pytest.mark.parametrize("activation", [None, "silu", "gelu"])
def test_second_order_gradients(activation: str | None, jit: bool) -> None:
    """A gradient penalty differentiates the hand-written gradient: compare with plain autodiff."""
    x = tf.constant(hard_data((2, 3, 3, 8), -1, 2.0, dtype=np.float64))
    gamma = tf.Variable(np.linspace(0.5, 1.5, 8))

    def plain(t: tf.Tensor) -> tf.Tensor:
        v = tf.reshape(t, (2, 3, 3, 4, 2))
        mean = tf.reduce_mean(v, axis=(1, 2, 4), keepdims=True)
        var = tf.reduce_mean(tf.square(v - mean), axis=(1, 2, 4), keepdims=True)
        y = tf.reshape((v - mean) / tf.sqrt(var + 1e-6), (2, 3, 3, 8)) * gamma
        return y if activation is None else (tf.nn.silu(y) if activation == "silu" else tf.nn.gelu(y, False))

    def ours(t: tf.Tensor) -> tf.Tensor:
        return groupnorm.group_norm(t, groups=4, gamma=gamma, activation_fn=activation)

    def penalty_grads(f: Any) -> list[np.ndarray]:
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = tf.reduce_sum(f(x) * tf.sin(x))
            penalty = tf.reduce_sum(tf.square(inner.gradient(loss, x)))
        return [g.numpy() for g in outer.gradient(penalty, [x, gamma])]

    for got, want in zip(penalty_grads(ours), penalty_grads(plain), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
