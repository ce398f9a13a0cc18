"""groupnorm.tf1.group_norm in tf.compat.v1 graph mode, with tf-slim 1.1's group_norm (the contrib
layer's code) as the oracle: values, gradients, variables, collections, scopes and checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from tf_slim.layers import layers as slim_layers
from tf_slim.layers import normalization as slim_normalization

import groupnorm.tf1
from groupnorm.backends import tensorflow as tf_backend
from support import Config, hard_data, reference_group_norm

v1 = tf.compat.v1
Keys = v1.GraphKeys

#: (shape, kwargs) configurations for the differential tests; the first axis is fed as dynamic.
DIFF_CONFIGS: list[tuple[tuple[int, ...], dict[str, Any]]] = [
    ((2, 4, 5, 8), {"groups": 4}),
    ((2, 8, 4, 5), {"groups": 2, "channels_axis": -3, "reduction_axes": (-2, -1)}),
    ((3, 12), {"groups": 3, "channels_axis": -1, "reduction_axes": ()}),  # 2-D
    ((5, 4, 6), {"groups": 3, "channels_axis": -1, "reduction_axes": (-3, -2)}),  # 3-D, no batch
    ((2, 3, 4, 4, 6), {"groups": 2}),  # 5-D video, time axis kept
    ((2, 6, 3, 4, 4), {"groups": 3, "channels_axis": 1, "reduction_axes": (2, 3, 4)}),  # NCDHW
    ((2, 4, 4, 8), {"groups": 8, "center": False}),
    ((2, 4, 4, 8), {"groups": 1, "scale": False, "epsilon": 1e-3}),
    ((2, 4, 4, 8), {"groups": 2, "center": False, "scale": False}),
    ((2, 4, 4, 8), {"groups": 2, "activation_fn": tf.nn.relu}),
    ((2, 4, 4, 8), {"groups": 4, "mean_close_to_zero": True}),
    ((2, 6, 4, 8), {"groups": 4, "reduction_axes": (-3,)}),
    ((4, 2, 3, 6), {"groups": 2, "channels_axis": 0, "reduction_axes": (-1,)}),
]


def _initializers(channels: int, seed: int, dtype: Any) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "gamma": v1.constant_initializer((1 + 0.5 * rng.standard_normal(channels)).astype(dtype)),
        "beta": v1.constant_initializer((0.5 * rng.standard_normal(channels)).astype(dtype)),
    }


@pytest.mark.parametrize(("shape", "kwargs"), DIFF_CONFIGS)
def test_values_and_gradients_match_tf_slim(
    shape: tuple[int, ...], kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _compare_with_tf_slim(shape, kwargs, np.float32)  # the default, XLA-compiled path
    monkeypatch.setattr(tf_backend, "JIT_COMPILE", False)
    _compare_with_tf_slim(shape, kwargs, np.float64)  # and the plain TensorFlow one


def _compare_with_tf_slim(shape: tuple[int, ...], kwargs: dict[str, Any], dtype: Any) -> None:
    c = kwargs.get("channels_axis", -1)
    x_val = hard_data(shape, c, 0.5, dtype=dtype, seed=len(shape))
    cot = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    inits = _initializers(shape[c], 2, dtype)
    graph = tf.Graph()
    with graph.as_default():
        first_kept = c % len(shape) != 0 and all(a % len(shape) != 0 for a in kwargs.get("reduction_axes", (-3, -2)))
        static = [None if first_kept else shape[0], *shape[1:]]
        x = v1.placeholder(dtype, static)
        outs = {
            "ours": groupnorm.tf1.group_norm(x, param_initializers=inits, scope="ours", **kwargs),
            "slim": slim_normalization.group_norm(x, param_initializers=inits, scope="slim", **kwargs),
        }
        grads = {}
        for name, y in outs.items():
            assert y.shape.as_list() == static
            assert y.dtype == dtype
            params = sorted(v1.get_collection(Keys.GLOBAL_VARIABLES, scope=name), key=lambda v: v.name)
            grads[name] = v1.gradients(tf.reduce_sum(y * cot), [x, *params])
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            got = sess.run({"outs": outs, "grads": grads}, {x: x_val})
    tol = 1e-5 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(got["outs"]["ours"], got["outs"]["slim"], rtol=0, atol=tol)
    assert len(got["grads"]["ours"]) == len(got["grads"]["slim"])
    for ours, slim in zip(got["grads"]["ours"], got["grads"]["slim"], strict=True):
        np.testing.assert_allclose(ours, slim, rtol=0, atol=20 * tol * max(1.0, np.abs(slim).max()))


def test_large_mean_accuracy() -> None:
    x_val = hard_data((2, 4, 4, 8), -1, 1e4)
    ref = reference_group_norm(x_val, 4)
    with tf.Graph().as_default():
        x = v1.placeholder(tf.float32, [None, 4, 4, 8])
        ours = groupnorm.tf1.group_norm(x, groups=4)
        ours_fast = groupnorm.tf1.group_norm(x, groups=4, mean_close_to_zero=True)
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            y, y_fast = sess.run([ours, ours_fast], {x: x_val})
    assert np.abs(y - ref).max() <= 1e-5
    assert np.isfinite(y_fast).all()  # one-pass but clamped: inaccurate here, never NaN


def _collections_of(graph: tf.Graph, var: Any) -> set[str]:
    return {k for k in graph.get_all_collection_keys() if any(v is var for v in graph.get_collection(k))}


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"trainable": False},
        {"center": False},
        {"scale": False},
        {"variables_collections": ["extra"]},
        {"variables_collections": {"beta": ["only_beta"], "gamma": ["only_gamma", "both"]}},
        {"outputs_collections": ["outs"]},
        {"scope": "block1/norm"},
    ],
)
@pytest.mark.parametrize("dtype", [tf.float16, tf.float32, tf.float64])
def test_variables_and_collections_match_tf_slim(kwargs: dict[str, Any], dtype: tf.DType) -> None:
    def build(layer: Any) -> tuple[tf.Graph, tf.Tensor]:
        graph = tf.Graph()
        with graph.as_default():
            x = v1.placeholder(dtype, [None, 4, 4, 8])
            y = layer(x, groups=2, **kwargs)
        return graph, y

    ours_graph, ours = build(groupnorm.tf1.group_norm)
    slim_graph, slim = build(slim_normalization.group_norm)

    def describe(graph: tf.Graph) -> list[tuple[str, list[int], tf.DType, set[str]]]:
        variables = graph.get_collection(Keys.GLOBAL_VARIABLES)
        return sorted((v.name, v.shape.as_list(), v.dtype.base_dtype, _collections_of(graph, v)) for v in variables)

    ours_vars = describe(ours_graph)
    assert ours_vars == describe(slim_graph)
    assert len(ours_vars) == kwargs.get("center", True) + kwargs.get("scale", True)
    assert ours.dtype == dtype
    assert ours.shape.as_list() == [None, 4, 4, 8]
    if "outputs_collections" in kwargs:
        (collected,) = ours_graph.get_collection("outs")
        assert collected is ours
        assert ours.aliases == slim.aliases == [kwargs.get("scope", "GroupNorm")]  # type: ignore[attr-defined]


def test_scopes_and_reuse() -> None:
    with tf.Graph().as_default() as graph:
        x = v1.placeholder(tf.float32, [None, 4, 4, 8])
        groupnorm.tf1.group_norm(x, groups=2)
        groupnorm.tf1.group_norm(x, groups=2)
        groupnorm.tf1.group_norm(x, groups=2, scope="shared")
        groupnorm.tf1.group_norm(x, groups=2, scope="shared", reuse=True)
        with v1.variable_scope("outer", reuse=v1.AUTO_REUSE):
            groupnorm.tf1.group_norm(x, groups=2, scope="auto")
            groupnorm.tf1.group_norm(x, groups=2, scope="auto")
        names = sorted(v.name for v in graph.get_collection(Keys.GLOBAL_VARIABLES))
        assert names == [
            f"{scope}/{p}:0"
            for scope in ("GroupNorm", "GroupNorm_1", "outer/auto", "shared")
            for p in ("beta", "gamma")
        ]
        with pytest.raises(ValueError, match="already exists"):
            groupnorm.tf1.group_norm(x, groups=2, scope="shared")
        with pytest.raises(ValueError, match="reuse=True"):
            groupnorm.tf1.group_norm(x, groups=2, reuse=True)


def test_param_initializers_keys() -> None:
    with tf.Graph().as_default():
        x = v1.placeholder(tf.float32, [None, 4, 4, 8])
        with pytest.raises(ValueError, match="moving_mean"):
            groupnorm.tf1.group_norm(x, groups=2, param_initializers={"moving_mean": v1.zeros_initializer()})
        y = groupnorm.tf1.group_norm(
            x,
            groups=2,
            param_initializers={"gamma": v1.constant_initializer(2.0), "beta": v1.constant_initializer(-1.0)},
        )
        x_val = hard_data((3, 4, 4, 8), -1, 1.0)
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            out = sess.run(y, {x: x_val})
    np.testing.assert_allclose(out, 2 * reference_group_norm(x_val, 2) - 1, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "kwargs", "match"),
    [
        (None, {}, "undefined rank"),
        ([None, 4, 4, 8], {"channels_axis": 4}, "Axis is out of bounds."),
        ([None, 4, 4, None], {"groups": 2}, "undefined channel dimension"),
        ([None, None, 4, 8], {"groups": 2}, "undefined dimensions"),
        ([None, 4, 4, 8], {"groups": 2, "reduction_axes": (-1,)}, "mutually exclusive"),
        ([None, 4, 4, 8], {"groups": 16}, "Invalid groups 16 for 8 channels."),
        ([None, 4, 4, 8], {"groups": 3}, "8 channels is not commensurate with 3 groups."),
        ([None, 4, 4, 8], {"groups": 2, "epsilon": -1e-3}, "epsilon"),
    ],
)
def test_contract_errors_before_any_variable(
    shape: list[int | None] | None, kwargs: dict[str, Any], match: str
) -> None:
    with tf.Graph().as_default() as graph:
        x = v1.placeholder(tf.float32, shape)
        with pytest.raises(ValueError, match=match):
            groupnorm.tf1.group_norm(x, **kwargs)
        assert graph.get_collection(Keys.GLOBAL_VARIABLES) == []


def _model(layer: Any, x: tf.Tensor, initializers: dict[str, Any] | None) -> tf.Tensor:
    """A small TF1-style network: conv, group norm + relu, conv, group norm over NCHW-like channels."""
    with v1.variable_scope("net"):
        h = slim_layers.conv2d(x, 16, 3, activation_fn=None, scope="conv1")
        h = layer(h, groups=4, activation_fn=tf.nn.relu, param_initializers=initializers)
        h = slim_layers.conv2d(h, 8, 3, activation_fn=None, scope="conv2")
        return layer(h, groups=2, scope="norm2")  # type: ignore[no-any-return]


def test_tf_slim_checkpoint_restores_unchanged(tmp_path: Path) -> None:
    x_val = hard_data((2, 6, 6, 3), -1, 2.0)
    with tf.Graph().as_default():
        x = v1.placeholder(tf.float32, [None, 6, 6, 3])
        y = _model(slim_normalization.group_norm, x, _initializers(16, 3, np.float32))
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            # make gamma/beta of the second norm non-trivial too
            for var in v1.get_collection(Keys.MODEL_VARIABLES, scope="net/norm2"):
                sess.run(var.assign(tf.random.stateless_normal(var.shape, (4, 5)) + 1.0))
            expected = sess.run(y, {x: x_val})
            saved_names = sorted(v.name for v in v1.global_variables())
            path = v1.train.Saver().save(sess, str(tmp_path / "model.ckpt"))

    with tf.Graph().as_default():
        x = v1.placeholder(tf.float32, [None, 6, 6, 3])
        y = _model(groupnorm.tf1.group_norm, x, None)
        assert sorted(v.name for v in v1.global_variables()) == saved_names
        with v1.Session() as sess:
            v1.train.Saver().restore(sess, path)
            got = sess.run(y, {x: x_val})
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_works_in_eager_mode_too() -> None:
    cfg = Config((2, 4, 4, 8), 4, -1, (-3, -2))
    x = hard_data(cfg.shape, -1, 3.0)
    y = groupnorm.tf1.group_norm(tf.constant(x), groups=4, epsilon=1e-5)
    np.testing.assert_allclose(y.numpy(), cfg.reference(x), atol=1e-5)


def test_tf2_migration_shim_creates_variables_once() -> None:
    import tf_keras
    from tf_keras.api._v1.keras.utils import track_tf1_style_variables

    class Block(tf_keras.layers.Layer):  # type: ignore[misc]
        @track_tf1_style_variables
        def call(self, x: tf.Tensor) -> tf.Tensor:
            h = groupnorm.tf1.group_norm(x, groups=4, epsilon=1e-5, scope="norm1")
            return groupnorm.tf1.group_norm(h, groups=2, epsilon=1e-5, activation_fn="relu", scope="norm2")

    block = Block()
    x = hard_data((2, 4, 4, 8), -1, 50.0)
    first = block(tf.constant(x))
    assert sorted(v.name for v in block.trainable_variables) == [
        f"{scope}/{p}:0" for scope in ("norm1", "norm2") for p in ("beta", "gamma")
    ]
    expected = np.maximum(reference_group_norm(reference_group_norm(x, 4, epsilon=1e-5), 2, epsilon=1e-5), 0)
    np.testing.assert_allclose(first.numpy(), expected, atol=1e-5)

    gamma = next(v for v in block.trainable_variables if v.name == "norm2/gamma:0")
    gamma.assign(tf.fill([8], 2.0))
    np.testing.assert_allclose(block(tf.constant(x)).numpy(), 2 * expected, atol=2e-5)

    @tf.function(input_signature=[tf.TensorSpec([None, 4, 4, 8], tf.float32)])
    def run(t: tf.Tensor) -> tf.Tensor:
        return block(t)  # type: ignore[no-any-return]

    np.testing.assert_allclose(run(tf.constant(x)).numpy(), 2 * expected, atol=2e-5)
    np.testing.assert_allclose(run(tf.constant(x[:1])).numpy(), 2 * expected[:1], atol=2e-5)
    assert len(block.variables) == 4
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(block(tf.constant(x)))
    assert all(g is not None for g in tape.gradient(loss, block.trainable_variables))


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_in_graph_mode(dtype: tf.DType) -> None:
    x_val = np.clip(hard_data((2, 4, 4, 8), -1, 3.0, std=1.5e4), -6e4, 6e4)  # squares overflow float16
    with tf.Graph().as_default():
        x = v1.placeholder(tf.float32, [None, 4, 4, 8])
        xh = tf.cast(x, dtype)
        y = groupnorm.tf1.group_norm(xh, groups=4, epsilon=1e-5)
        assert y.dtype == dtype
        assert {v.dtype.base_dtype for v in v1.global_variables()} == {dtype}
        (dx,) = v1.gradients(tf.reduce_sum(tf.cast(y, tf.float32)), [xh])
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            out, rounded, grad = sess.run(
                [tf.cast(y, tf.float64), tf.cast(xh, tf.float64), tf.cast(dx, tf.float32)], {x: x_val}
            )
    assert np.isfinite(out).all()
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(
        out, reference_group_norm(rounded, 4, epsilon=1e-5), atol=2e-2 if dtype == tf.float16 else 8e-2
    )
