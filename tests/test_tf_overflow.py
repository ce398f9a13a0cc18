"""float32 input beyond the range of its squares (|x - mean| above about 1.8e19): the TensorFlow backend
and its front-ends (groupnorm.group_norm, groupnorm.tf1, groupnorm.keras, and the keras.ops path that
serves Keras's other backends) still return the finite, exact result, values and gradients, against the
float64 reference."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

import groupnorm
import groupnorm.numpy as gnp
import groupnorm.tf1
from groupnorm.backends import keras as keras_backend
from groupnorm.backends import tensorflow as tf_backend
from groupnorm.keras import GroupNormalization
from support import hard_data, reference_group_norm, run_python

v1 = tf.compat.v1
SCALES = [3e19, 1e30]
EPS = 1e-5

#: (shape, channels_axis, reduction_axes)
LAYOUTS = {
    "nhwc": ((2, 6, 5, 16), -1, (-3, -2)),
    "nchw": ((2, 16, 6, 5), 1, (2, 3)),
}


def _data(scale: float, layout: str = "nhwc") -> dict[str, Any]:
    shape, c, axes = LAYOUTS[layout]
    x = (scale * hard_data(shape, c, 0.0, dtype=np.float64)).astype(np.float32)
    rng = np.random.default_rng(5)
    return {
        "x": x,
        "dy": rng.standard_normal(shape).astype(np.float32),
        "gamma": np.linspace(0.5, 2.0, shape[c]).astype(np.float32),
        "beta": np.linspace(-1.0, 1.0, shape[c]).astype(np.float32),
        "c": c,
        "axes": axes,
    }


def _check(d: dict[str, Any], y: Any, grads: list[Any], activation: str | None = None) -> None:
    """``y`` and the gradients of ``sum(y * dy)`` for ``x``, ``gamma``, ``beta`` against float64."""
    want = reference_group_norm(d["x"], 4, d["c"], d["axes"], d["gamma"], d["beta"], EPS, activation)
    y = np.asarray(y, np.float64)
    assert np.isfinite(y).all()
    assert np.abs(y - want).max() <= 1e-5
    expected = gnp.vjp(
        d["x"].astype(np.float64),
        d["dy"].astype(np.float64),
        4,
        d["c"],
        d["axes"],
        gamma=d["gamma"].astype(np.float64),
        beta=d["beta"].astype(np.float64),
        epsilon=EPS,
        activation_fn=activation,
    )
    assert len(grads) == 3
    for got, exp in zip(grads, (expected.inputs, expected.gamma, expected.beta), strict=True):
        assert exp is not None and got is not None
        got = np.asarray(got, np.float64)
        assert np.isfinite(got).all()
        assert np.abs(got - exp).max() <= 1e-5 * np.abs(exp).max()


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(
    ("layout", "activation", "jit"),
    [("nhwc", None, True), ("nchw", None, True), ("nhwc", "gelu", True), ("nhwc", None, False)],
)
@pytest.mark.parametrize("mean_close_to_zero", [False, True])
def test_group_norm(
    scale: float,
    layout: str,
    activation: str | None,
    jit: bool,
    mean_close_to_zero: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``mean_close_to_zero``: one-pass sums of x and x * x overflow the same way; this data is centred
    (mean 0 +/- a few percent of its spread), so the one-pass result is exact too."""
    monkeypatch.setattr(tf_backend, "JIT_COMPILE", jit)
    d = _data(scale, layout)
    x, gamma, beta = (tf.Variable(d[k]) for k in ("x", "gamma", "beta"))
    with tf.GradientTape() as tape:
        y = groupnorm.group_norm(
            x,
            4,
            d["c"],
            d["axes"],
            gamma=gamma,
            beta=beta,
            epsilon=EPS,
            activation_fn=activation,
            mean_close_to_zero=mean_close_to_zero,
        )
        loss = tf.reduce_sum(y * d["dy"])
    _check(d, y.numpy(), [g.numpy() for g in tape.gradient(loss, [x, gamma, beta])], activation)


@pytest.mark.parametrize("scale", SCALES)
def test_tf1_graph_with_dynamic_batch(scale: float) -> None:
    d = _data(scale)
    inits = {"gamma": v1.constant_initializer(d["gamma"]), "beta": v1.constant_initializer(d["beta"])}
    with tf.Graph().as_default():
        x = v1.placeholder(tf.float32, [None, *d["x"].shape[1:]])
        y = groupnorm.tf1.group_norm(x, groups=4, epsilon=EPS, param_initializers=inits, scope="gn")
        params = sorted(v1.global_variables(), key=lambda v: v.name)  # beta, gamma
        gx, gbeta, ggamma = v1.gradients(tf.reduce_sum(y * d["dy"]), [x, *params])
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            got = sess.run([y, gx, ggamma, gbeta], {x: d["x"]})
    _check(d, got[0], got[1:])


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("mean_close_to_zero", [False, True])
def test_keras_layer(scale: float, portable: bool, mean_close_to_zero: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    assert keras.backend.backend() == "tensorflow"
    if portable:  # the keras.ops path that serves Keras's other backends
        saved = keras_backend.execute
        monkeypatch.setattr(keras_backend, "execute", lambda *a, **k: saved(*a, **k, portable=True))
    d = _data(scale)
    layer = GroupNormalization(groups=4, epsilon=EPS, mean_close_to_zero=mean_close_to_zero)
    layer.build(d["x"].shape)
    layer.gamma.assign(d["gamma"])
    layer.beta.assign(d["beta"])
    x = tf.Variable(d["x"])
    with tf.GradientTape() as tape:
        y = layer(x)
        loss = tf.reduce_sum(y * d["dy"])
    _check(d, y.numpy(), [g.numpy() for g in tape.gradient(loss, [x, layer.gamma, layer.beta])])


#: groupnorm.keras on another Keras backend (keras.ops, the backend's own autodiff), run in a process of
#: its own (Keras reads KERAS_BACKEND at import): values and input gradients at both scales
OTHER_BACKEND_CHECK = """
import os, sys
os.environ["KERAS_BACKEND"] = backend = sys.argv[1]
import keras, numpy as np
import groupnorm.numpy as gnp
from groupnorm.keras import GroupNormalization
from support import hard_data, reference_group_norm
assert keras.backend.backend() == backend
gamma = np.linspace(0.5, 2.0, 16)
for scale in (3e19, 1e30):
    x = (scale * hard_data((2, 6, 5, 16), -1, 0.0, dtype=np.float64)).astype(np.float32)
    dy = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    layer = GroupNormalization(groups=4, epsilon=1e-5)
    layer.build(x.shape)
    layer.gamma.assign(gamma.astype(np.float32))
    if backend == "jax":
        import jax
        values = [v.value for v in layer.trainable_variables]
        def f(z):
            return layer.stateless_call(values, [], z)[0]
        y = np.asarray(jax.jit(f)(x))
        dx = np.asarray(jax.jit(jax.grad(lambda z: (f(z) * dy).sum()))(x))
    else:
        import torch
        xt = torch.tensor(x, requires_grad=True)
        yt = layer(xt)
        (yt * torch.tensor(dy)).sum().backward()
        y, dx = yt.detach().numpy(), xt.grad.numpy()
    want = reference_group_norm(x, 4, gamma=gamma, epsilon=1e-5)
    expected = gnp.vjp(x.astype(np.float64), dy.astype(np.float64), 4, gamma=gamma, epsilon=1e-5).inputs
    assert np.isfinite(y).all() and np.abs(y - want).max() <= 1e-5, (scale, np.abs(y - want).max())
    assert np.isfinite(dx).all(), scale
    assert np.abs(dx - expected).max() <= 1e-5 * np.abs(expected).max(), (scale, np.abs(dx - expected).max())
print("exact on", backend)
"""


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_layer_on_other_backends(backend: str) -> None:
    result = run_python("-c", OTHER_BACKEND_CHECK, backend)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"exact on {backend}" in result.stdout
