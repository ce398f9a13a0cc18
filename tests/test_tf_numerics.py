"""The numerics of groupnorm._numerics on the TensorFlow backend and its front-ends (tf.function, XLA,
tf1 graphs, Keras on TensorFlow, and the keras.ops path that serves Keras's other backends): the same
statistics as the NumPy transcription, the cases that went wrong before, and the hard regimes drawn
group by group, against the float64 reference."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import groupnorm
import groupnorm.numpy as gnp
import groupnorm.tf1
from groupnorm._plan import make_plan
from groupnorm.backends import keras as keras_backend
from groupnorm.backends import numpy as np_backend
from groupnorm.backends import tensorflow as tfb
from groupnorm.keras import GroupNormalization
from hard_regimes import HARD_CONFIGS, check_hard, hard_inputs, parameters
from support import Config, configs, hard_data, reference_group_norm

v1 = tf.compat.v1


@pytest.fixture(params=[True, False], ids=["xla", "no-xla"])
def jit(request: pytest.FixtureRequest) -> Iterator[bool]:
    saved = tfb.JIT_COMPILE
    tfb.JIT_COMPILE = request.param
    yield request.param
    tfb.JIT_COMPILE = saved


def _group_norm(x: np.ndarray, groups: int, axes: tuple[int, ...]) -> np.ndarray:
    return groupnorm.group_norm(tf.constant(x), groups, reduction_axes=axes).numpy()  # type: ignore[no-any-return]


def _in_function(jit_compile: bool) -> Callable[[np.ndarray, int, tuple[int, ...]], np.ndarray]:
    def run(x: np.ndarray, groups: int, axes: tuple[int, ...]) -> np.ndarray:
        f = tf.function(lambda t: groupnorm.group_norm(t, groups, reduction_axes=axes), jit_compile=jit_compile)
        return f(tf.constant(x)).numpy()  # type: ignore[no-any-return]

    return run


def _tf1(x: np.ndarray, groups: int, axes: tuple[int, ...]) -> np.ndarray:
    with tf.Graph().as_default():
        t = v1.placeholder(tf.float32, [None, *x.shape[1:]])
        y = groupnorm.tf1.group_norm(t, groups=groups, reduction_axes=axes, scope="gn")
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            return sess.run(y, {t: x})  # type: ignore[no-any-return]


def _keras(x: np.ndarray, groups: int, axes: tuple[int, ...]) -> np.ndarray:
    assert keras.backend.backend() == "tensorflow"
    layer = GroupNormalization(groups=groups, reduction_axes=axes, epsilon=1e-6)
    return np.asarray(layer(tf.constant(x)))


def _keras_ops(x: np.ndarray, groups: int, axes: tuple[int, ...]) -> np.ndarray:
    plan = make_plan(x.shape, "float32", groups=groups, reduction_axes=axes)
    return np.asarray(keras_backend.execute(plan, tf.constant(x), None, None, None, portable=True))


PATHS: dict[str, Callable[[np.ndarray, int, tuple[int, ...]], np.ndarray]] = {
    "group_norm": _group_norm,
    "tf.function": _in_function(False),
    "tf.function-jit_compile": _in_function(True),
    "tf1-session": _tf1,
    "keras-layer": _keras,
    "keras.ops": _keras_ops,
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_huge_values_outside_the_corner(path: str, jit: bool) -> None:
    """Before: 0 instead of +-22.6 (the overflow scaling looked at the group's corner only)."""
    x = np.zeros((1, 16, 16, 4), np.float32)
    x[0, 15, 15, 0] = 3e19
    x[0, 15, 14, 1] = -3e19
    y = PATHS[path](x, 1, (1, 2))
    want = reference_group_norm(x, 1, -1, (1, 2))
    assert abs(want[0, 15, 15, 0] - 22.627) < 1e-3
    assert np.all(np.abs(y - want) <= 1e-5 * (1 + np.abs(want)))


@pytest.mark.parametrize("path", sorted(PATHS))
def test_nan_in_one_sample_leaves_huge_values_in_another_exact(path: str, jit: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 8)).astype(np.float32)
    x[0, 0, 0, 0] = 1e30
    x[1, 1, 2, 5] = np.nan
    y = PATHS[path](x, 4, (1, 2))
    with np.errstate(invalid="ignore"):
        want = reference_group_norm(x, 4)
    assert np.isfinite(y[0]).all()
    assert np.all(np.abs(y[0] - want[0]) <= 1e-5 * (1 + np.abs(want[0])))
    assert np.isnan(y[1, :, :, 4:6]).all() and np.isfinite(np.delete(y[1], [4, 5], axis=-1)).all()


def test_gradients_with_huge_values_outside_the_corner(jit: bool) -> None:
    x = np.zeros((2, 8, 8, 4), np.float32)
    x[:, 7, 7, 0] = 3e19
    x[:, 6, 5, 1] = -1e30
    x += np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    dy = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    gamma = tf.Variable(np.linspace(0.5, 2, 4).astype(np.float32))
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(groupnorm.group_norm(xt, 2, gamma=gamma) * dy)
    dx, dgamma = tape.gradient(loss, [xt, gamma])
    exact = gnp.vjp(x.astype(np.float64), dy.astype(np.float64), 2, gamma=gamma.numpy().astype(np.float64))
    for got, want in ((dx.numpy(), exact.inputs), (dgamma.numpy(), exact.gamma)):
        assert np.isfinite(got).all()
        assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max()


@settings(max_examples=40, deadline=None)
@given(configs(max_rank=5, max_size=5), st.sampled_from([0.0, 3.0, 1e4]))
def test_statistics_are_the_numpy_transcriptions(cfg: Config, mean_over_std: float) -> None:
    """The same shift (the same corner elements), unit, mean and variance per group as NumPy's."""
    x = hard_data(cfg.shape, cfg.channels_axis, mean_over_std, dtype=np.float32, seed=cfg.seed)
    plan = make_plan(x.shape, "float32", groups=cfg.groups, channels_axis=cfg.channels_axis,
                     reduction_axes=cfg.reduction_axes, mean_close_to_zero=cfg.mean_close_to_zero)  # fmt: skip
    ours = [np.asarray(s).reshape(-1) for s in tfb.group_statistics(plan, x)]
    theirs = [np.asarray(s).reshape(-1) for s in np_backend.group_statistics(plan, x)]
    shift, unit, mean, var = (np.asarray(t, np.float64) for t in theirs)
    scale = np.sqrt(var) + np.abs(mean) + 1e-30
    np.testing.assert_allclose(ours[0], shift, rtol=1e-6, atol=1e-6 * np.max(scale))
    np.testing.assert_array_equal(ours[1], unit)
    np.testing.assert_allclose(ours[2], mean, rtol=0, atol=1e-5 * np.max(scale))
    # float32 sums in another order: the variance to a few units of the second moment of x * u - K
    np.testing.assert_allclose(ours[3], var, rtol=1e-4, atol=1e-5 * np.max(var + mean**2, initial=0))


@settings(max_examples=30, deadline=None)
@given(st.data(), st.sampled_from(HARD_CONFIGS), st.sampled_from(["xla", "graph", "keras.ops"]))
def test_hard_regimes(data: st.DataObject, cfg: Config, path: str) -> None:
    case = data.draw(hard_inputs(cfg, np.float32))
    gamma, beta = parameters(cfg)
    g = None if gamma is None else tf.constant(gamma)
    b = None if beta is None else tf.constant(beta)
    if path == "keras.ops":
        plan = make_plan(cfg.shape, "float32", groups=cfg.groups, channels_axis=cfg.channels_axis,
                         reduction_axes=cfg.reduction_axes, epsilon=cfg.epsilon,
                         mean_close_to_zero=cfg.mean_close_to_zero)  # fmt: skip
        y = keras_backend.execute(plan, tf.constant(case.x), g, b, cfg.activation, portable=True)
    else:
        saved = tfb.JIT_COMPILE
        tfb.JIT_COMPILE = path == "xla"
        try:
            y = groupnorm.group_norm(tf.constant(case.x), gamma=g, beta=b, **cfg.kwargs())
        finally:
            tfb.JIT_COMPILE = saved
    check_hard(np.asarray(y), case, cfg, gamma, beta)


@settings(max_examples=15, deadline=None)
@given(st.data(), st.sampled_from(HARD_CONFIGS[:3]))
def test_hard_regimes_float16(data: st.DataObject, cfg: Config) -> None:
    case = data.draw(hard_inputs(cfg, np.float16))
    y = groupnorm.group_norm(tf.constant(case.x), **cfg.kwargs())
    assert y.dtype == tf.float16
    check_hard(y.numpy(), case, cfg)


def test_hard_regime_gradients() -> None:
    """Gradients on one hard draw per regime mix, against the float64 vjp (groups with an answer)."""
    cfg = HARD_CONFIGS[0]
    rng = np.random.default_rng(3)
    x = rng.standard_normal(cfg.shape)
    x[0, :, :, :2] *= 1e30  # a huge group
    x[0, 3, 4, 2] = 1e25  # a huge value far from its group's corner
    x[1, :, :, :2] = 1e-30 * rng.standard_normal((4, 5, 2))  # a tiny group
    x[1, :, :, 2:] = 7.25  # a constant group
    x = x.astype(np.float32)
    dy = rng.standard_normal(cfg.shape).astype(np.float32)
    gamma = tf.Variable(np.linspace(0.5, 2, 4).astype(np.float32))
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(groupnorm.group_norm(xt, 2, gamma=gamma, epsilon=1e-5) * dy)
    dx = tape.gradient(loss, xt).numpy()
    exact = gnp.vjp(
        x.astype(np.float64), dy.astype(np.float64), 2, gamma=gamma.numpy().astype(np.float64), epsilon=1e-5
    )
    for k in range(2):
        for sl in (slice(0, 2), slice(2, 4)):
            got, want = dx[k, ..., sl], exact.inputs[k, ..., sl]
            assert np.isfinite(got).all()
            assert np.abs(got - want).max() <= 3e-5 * (np.abs(want).max() + 1e-30), (k, sl)


def test_numpy_and_tensorflow_agree_on_the_rescue(jit: bool) -> None:
    """One group per regime in one call: the same per-group units on both backends."""
    x = hard_data((4, 16, 16, 4), -1, 1.0, dtype=np.float64)
    x[0, 9, 9, 0] = 1e30
    x[1] *= 1e-30
    x[2, 0, :8, :] = 1e4
    x = x.astype(np.float32)
    plan = make_plan(x.shape, "float32", groups=2, epsilon=0.0)
    ours, theirs = tfb.group_statistics(plan, x), np_backend.group_statistics(plan, x)
    np.testing.assert_array_equal(np.asarray(ours.unit).reshape(-1), np.asarray(theirs.unit).reshape(-1))
    assert np.count_nonzero(np.asarray(theirs.unit) != 1) >= 3
