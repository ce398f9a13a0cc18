"""The JAX backend: values against the float64 reference, gradients against ``groupnorm.numpy.vjp``,
the transformations (jit, grad, jvp, vmap, checkpoint), reduced precision, accuracy on hard data, and
every contract error for JAX arrays."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax import export

import groupnorm
import groupnorm.numpy as gnp
from groupnorm.backends import jax as jax_backend
from support import NAMED_CONFIGS, Config, configs, hard_data, reference_group_norm


def _jnp(a: np.ndarray | None) -> jax.Array | None:
    return None if a is None else jnp.asarray(a)


def _forward(cfg: Config, x: Any, gamma: Any, beta: Any) -> jax.Array:
    return groupnorm.group_norm(x, gamma=gamma, beta=beta, **cfg.kwargs())


def _jax_vjp(cfg: Config, a: dict[str, Any]) -> tuple[Any, ...]:
    """(y, dx, dgamma, dbeta) from jax.vjp of the jit-compiled forward pass."""
    args = (jnp.asarray(a["x"]), _jnp(a["gamma"]), _jnp(a["beta"]))
    y, pullback = jax.vjp(jax.jit(lambda x, g, b: _forward(cfg, x, g, b)), *args)
    return (y, *pullback(jnp.asarray(a["cotangent"])))


def _check_against_numpy(cfg: Config, a: dict[str, Any], rtol: float, atol: float) -> None:
    y, dx, dgamma, dbeta = _jax_vjp(cfg, a)
    np.testing.assert_allclose(np.asarray(y), cfg.reference(a["x"], a["gamma"], a["beta"]), rtol=rtol, atol=atol)
    ref = gnp.vjp(a["x"], a["cotangent"], gamma=a["gamma"], beta=a["beta"], **cfg.kwargs())
    scale = 1 + float(np.max(np.abs(ref.inputs)))
    np.testing.assert_allclose(np.asarray(dx), ref.inputs, rtol=rtol, atol=atol * scale)
    for got, want in ((dgamma, ref.gamma), (dbeta, ref.beta)):
        assert (got is None) == (want is None)
        if want is not None:
            np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=atol * (1 + np.max(np.abs(want))))


@pytest.mark.parametrize("name", sorted(NAMED_CONFIGS))
def test_named_configs_float64_values_and_gradients(name: str) -> None:
    cfg = NAMED_CONFIGS[name]
    with jax.enable_x64(True):
        _check_against_numpy(cfg, cfg.arrays(np.float64), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(NAMED_CONFIGS))
def test_named_configs_float32(name: str) -> None:
    cfg = NAMED_CONFIGS[name]
    a = cfg.arrays(np.float32)
    y = groupnorm.group_norm(jnp.asarray(a["x"]), gamma=_jnp(a["gamma"]), beta=_jnp(a["beta"]), **cfg.kwargs())
    assert isinstance(y, jax.Array)
    assert y.dtype == jnp.float32
    assert y.shape == a["x"].shape
    np.testing.assert_allclose(np.asarray(y), cfg.reference(a["x"], a["gamma"], a["beta"]), atol=2e-6)


@settings(max_examples=20, deadline=None)
@given(configs())
def test_random_configs_values_and_gradients_float64(cfg: Config) -> None:
    with jax.enable_x64(True):
        _check_against_numpy(cfg, cfg.arrays(np.float64, mean_over_std=3.0), rtol=1e-8, atol=1e-8)


@settings(max_examples=12, deadline=None)
@given(configs())
def test_random_configs_float32(cfg: Config) -> None:
    # the one-pass sums of mean_close_to_zero=True are only accurate where the mean is small
    a = cfg.arrays(np.float32, mean_over_std=0.0 if cfg.mean_close_to_zero else 3.0)
    y = jax.jit(lambda x, g, b: _forward(cfg, x, g, b))(jnp.asarray(a["x"]), _jnp(a["gamma"]), _jnp(a["beta"]))
    want = cfg.reference(a["x"], a["gamma"], a["beta"])
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)


# Groups of 4 * 64 * 32 = 8192 elements, whose corner is 8 of their 2048 positions.
LARGE = Config((2, 64, 32, 16), 4, -1, (-3, -2))


def test_large_groups_and_a_corner_far_from_its_group() -> None:
    with jax.enable_x64(True):
        _check_against_numpy(LARGE, LARGE.arrays(np.float64), rtol=1e-9, atol=1e-9)
        # where the corner is far from the group's mean, the rescue takes the sums again around it
        far = LARGE.arrays(np.float64, mean_over_std=50.0)
        assert far["x"] is not None
        far["x"][:, :2] = -200.0
        plan = groupnorm.make_plan(LARGE.shape, "float64", groups=LARGE.groups)
        assert bool(jnp.any(jax_backend.group_statistics(plan, far["x"]).unit != 1))
        _check_against_numpy(LARGE, far, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("corner_far_from_mean", [False, True])
def test_accuracy_at_group_mean_1e4_times_std(layout: str, corner_far_from_mean: bool) -> None:
    """float32, group mean 1e4 x std: max error <= 1e-5 against float64, jit-compiled, including data
    whose first rows (where the shift's corner lies) are far from the rest."""
    shape, c, axes = ((2, 64, 32, 16), -1, (-3, -2)) if layout == "nhwc" else ((2, 16, 64, 32), 1, (2, 3))
    x = hard_data(shape, c, 1e4)
    if corner_far_from_mean:
        sl = (slice(None), slice(0, 2)) if layout == "nhwc" else (slice(None), slice(None), slice(0, 2))
        x[sl] = np.float32(-3e4)
    gamma = np.linspace(0.5, 2, 16).astype(np.float32)
    beta = np.linspace(-1, 1, 16).astype(np.float32)
    fn = jax.jit(lambda x, g, b: groupnorm.group_norm(x, 4, c, axes, gamma=g, beta=b))
    y = fn(jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta))
    want = reference_group_norm(x, 4, c, axes, gamma, beta)
    assert np.max(np.abs(np.asarray(y, np.float64) - want)) <= 1e-5


def test_mean_close_to_zero_never_nan_and_fast_path_is_one_pass() -> None:
    x = jnp.asarray(hard_data((2, 4, 4, 8), -1, 1e4))
    y = groupnorm.group_norm(x, groups=2, mean_close_to_zero=True)
    assert bool(jnp.all(jnp.isfinite(y)))
    small = hard_data((2, 4, 4, 8), -1, 0.1)
    y = groupnorm.group_norm(jnp.asarray(small), groups=2, mean_close_to_zero=True)
    np.testing.assert_allclose(np.asarray(y), reference_group_norm(small, 2), atol=1e-5)


@pytest.mark.parametrize(("dtype", "atol"), [(jnp.float16, 4e-3), (jnp.bfloat16, 3e-2)])
def test_reduced_precision_inputs_use_float32_statistics(dtype: Any, atol: float) -> None:
    # float16 near its range: a float16 sum or sum of squares would overflow to inf.
    x32 = hard_data((2, 8, 8, 8), -1, 20.0, std=2000.0) if dtype == jnp.float16 else hard_data((2, 8, 8, 8), -1, 3.0)
    x = jnp.asarray(x32).astype(dtype)
    gamma = jnp.linspace(0.5, 1.5, 8).astype(dtype)
    beta = jnp.linspace(-1, 1, 8).astype(dtype)
    fn = jax.jit(lambda x, g, b: groupnorm.group_norm(x, groups=4, gamma=g, beta=b, activation_fn="silu"))
    y = fn(x, gamma, beta)
    assert y.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(y)))
    want = reference_group_norm(
        np.asarray(x.astype(jnp.float32)), 4, gamma=np.asarray(gamma.astype(jnp.float32)),
        beta=np.asarray(beta.astype(jnp.float32)), activation="silu",
    )  # fmt: skip
    assert np.max(np.abs(np.asarray(y.astype(jnp.float32)) - want)) <= atol
    grads = jax.grad(lambda x, g, b: jnp.sum(fn(x, g, b).astype(jnp.float32)), argnums=(0, 1, 2))(x, gamma, beta)
    assert [g.dtype for g in grads] == [dtype] * 3
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


CFG = Config((3, 4, 5, 8), 4, -1, (-3, -2), activation="gelu")


def _cfg_fn(x: jax.Array, g: jax.Array, b: jax.Array) -> jax.Array:
    return _forward(CFG, x, g, b)


def _cfg_arrays(dtype: Any = np.float32) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    a = CFG.arrays(dtype, mean_over_std=5.0)
    return jnp.asarray(a["x"]), jnp.asarray(a["gamma"]), jnp.asarray(a["beta"]), jnp.asarray(a["cotangent"])


def test_vmap_matches_per_example_calls() -> None:
    x, g, b, _ = _cfg_arrays()
    # vmap over a leading axis the plan never sees: each example is a (4, 5, 8) HWC input.
    batched = jax.vmap(lambda xi: groupnorm.group_norm(xi, 4, gamma=g, beta=b, activation_fn="gelu"))(x)
    for i in range(x.shape[0]):
        one = groupnorm.group_norm(x[i], 4, gamma=g, beta=b, activation_fn="gelu")
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(one), atol=1e-6)
    # vmap over the channel parameters as well, and over a non-leading input axis.
    gs = jnp.stack([g, 2 * g])
    per_gamma = jax.vmap(lambda gi: _cfg_fn(x, gi, b))(gs)
    np.testing.assert_allclose(np.asarray(per_gamma[1]), np.asarray(_cfg_fn(x, 2 * g, b)), atol=1e-6)
    moved = jax.vmap(lambda xi: groupnorm.group_norm(xi, 4, gamma=g, beta=b, activation_fn="gelu"), in_axes=2)(
        jnp.moveaxis(x, 0, 2)
    )
    np.testing.assert_allclose(np.asarray(moved), np.asarray(batched), atol=1e-6)


def test_vmap_of_large_groups_with_a_far_corner() -> None:
    x = hard_data((3, 64, 32, 16), -1, 1e4)
    x[1, :2] = -3e4  # one example needs the rescue (its corner is far from its mean)
    fn = jax.vmap(lambda xi: groupnorm.group_norm(xi, 4))
    y = jax.jit(fn)(jnp.asarray(x))
    assert np.max(np.abs(np.asarray(y, np.float64) - reference_group_norm(x, 4))) <= 1e-5


@pytest.mark.parametrize(
    "cfg",
    [
        Config((1, 64, 64, 64), groups=8, channels_axis=-1, reduction_axes=(1, 2)),  # NHWC, per channel first
        Config((1, 64, 16, 16), groups=8, channels_axis=1, reduction_axes=(2, 3)),  # NCHW
        Config((1, 8, 8, 64), groups=8, channels_axis=-1, reduction_axes=(1, 2), affine=False),  # small: direct
        Config((1, 13, 17, 32), groups=4, channels_axis=-1, reduction_axes=(1, 2)),  # no even split of 221
        Config((1, 7, 32), groups=4, channels_axis=-1, reduction_axes=(1,)),  # a prime extent: not split
    ],
    ids=["nhwc", "nchw", "small", "odd", "prime"],
)
def test_batch_of_one_values_and_gradients(cfg: Config) -> None:
    """A batch of one runs its output through a split of the positions (for XLA's sake): float32 values and
    gradients against float64, and forward mode against reverse mode."""
    a = cfg.arrays(np.float32, mean_over_std=100.0)
    _check_against_numpy(cfg, a, rtol=2e-4, atol=2e-4)
    x, g, b, ct = (jnp.asarray(a[k]) if a[k] is not None else None for k in ("x", "gamma", "beta", "cotangent"))

    def loss(x: jax.Array) -> jax.Array:
        return jnp.sum(_forward(cfg, x, g, b) * ct)

    v = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.float32)
    forward = jax.jit(lambda x, v: jax.jvp(loss, (x,), (v,))[1])(x, v)
    np.testing.assert_allclose(float(forward), float(jnp.vdot(jax.jit(jax.grad(loss))(x), v)), rtol=1e-3)


def test_grad_checkpoint_and_jit_agree_with_numpy_vjp() -> None:
    with jax.enable_x64(True):
        x, g, b, ct = _cfg_arrays(np.float64)

        def loss(x: jax.Array, g: jax.Array, b: jax.Array) -> jax.Array:
            return jnp.sum(_cfg_fn(x, g, b) * ct)

        ref = gnp.vjp(np.asarray(x), np.asarray(ct), gamma=np.asarray(g), beta=np.asarray(b), **CFG.kwargs())
        for fn in (loss, jax.checkpoint(loss), jax.jit(jax.checkpoint(loss))):
            grads = jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(x, g, b)
            for got, want in zip(grads, (ref.inputs, ref.gamma, ref.beta), strict=True):
                np.testing.assert_allclose(np.asarray(got), want, rtol=1e-9, atol=1e-10)


def test_forward_mode_and_second_order() -> None:
    """Forward mode agrees with reverse mode (the statistics have a custom JVP, which JAX transposes),
    and second derivatives exist: a Hessian-vector product matches finite differences of the gradient."""
    with jax.enable_x64(True):
        x, g, b, ct = _cfg_arrays(np.float64)

        def loss(x: jax.Array) -> jax.Array:
            return jnp.sum(_cfg_fn(x, g, b) * ct)

        v = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape))
        _, jvp_out = jax.jvp(loss, (x,), (v,))
        np.testing.assert_allclose(float(jvp_out), float(jnp.vdot(jax.grad(loss)(x), v)), rtol=1e-9)
        hvp = jax.jvp(jax.grad(loss), (x,), (v,))[1]
        h = 1e-5
        fd = (jax.grad(loss)(x + h * v) - jax.grad(loss)(x - h * v)) / (2 * h)
        np.testing.assert_allclose(np.asarray(hvp), np.asarray(fd), rtol=1e-4, atol=1e-6)


def test_pure_and_dynamic_batch() -> None:
    x, g, b, _ = _cfg_arrays()
    before = np.asarray(x).copy()
    y1, y2 = _cfg_fn(x, g, b), _cfg_fn(x, g, b)
    np.testing.assert_array_equal(np.asarray(x), before)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
    # A symbolic batch dimension (jax.export) is allowed; the reduced and channel dims are static.
    shape = export.symbolic_shape("batch, 4, 5, 8")
    exported = export.export(jax.jit(lambda x: groupnorm.group_norm(x, 4)))(jax.ShapeDtypeStruct(shape, jnp.float32))
    np.testing.assert_allclose(
        np.asarray(exported.call(x)), np.asarray(groupnorm.group_norm(x, 4)), rtol=1e-6, atol=1e-6
    )


def test_parameters_may_be_numpy_and_callable_activation() -> None:
    x, g, b, _ = _cfg_arrays()
    y = groupnorm.group_norm(x, 4, gamma=np.asarray(g), beta=np.asarray(b), activation_fn=jnp.tanh)
    want = np.tanh(reference_group_norm(np.asarray(x), 4, gamma=np.asarray(g), beta=np.asarray(b)))
    np.testing.assert_allclose(np.asarray(y), want, atol=2e-6)


def test_empty_input() -> None:
    y = groupnorm.group_norm(jnp.zeros((0, 4, 4, 8)), groups=2)
    assert y.shape == (0, 4, 4, 8)
    assert y.dtype == jnp.float32


X = jnp.zeros((2, 4, 4, 8))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"channels_axis": 4}, ValueError, "Axis is out of bounds."),
        ({"channels_axis": -5}, ValueError, "Axis is out of bounds."),
        ({"reduction_axes": (1, 4)}, ValueError, "Axis is out of bounds."),
        ({"reduction_axes": (1, 3)}, ValueError, "reduction_axis must be mutually exclusive with channels_axis"),
        ({"reduction_axes": (1, -3)}, ValueError, "name the same axis twice"),
        ({"groups": 16}, ValueError, "Invalid groups 16 for 8 channels."),
        ({"groups": 3}, ValueError, "8 channels is not commensurate with 3 groups."),
        ({"groups": 0}, ValueError, "groups must be a positive int"),
        ({"groups": -2}, ValueError, "groups must be a positive int"),
        ({"groups": 2.0}, TypeError, "groups must be a positive int"),
        ({"groups": True}, TypeError, "groups must be a positive int"),
        ({"channels_axis": 1.0}, TypeError, "must be an int"),
        ({"reduction_axes": (True, 2)}, TypeError, "must be an int"),
        ({"epsilon": -1e-3}, ValueError, "epsilon must be a finite number >= 0"),
        ({"epsilon": float("nan")}, ValueError, "epsilon must be a finite number >= 0"),
        ({"gamma": jnp.ones(4)}, ValueError, r"gamma must have shape \[8\]"),
        ({"beta": jnp.ones((8, 1))}, ValueError, r"beta must have shape \[8\]"),
        ({"activation_fn": "tanh"}, ValueError, "Unknown activation"),
        ({"activation_fn": 3}, TypeError, "activation must be None, a callable"),
    ],
)
def test_contract_errors(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    kwargs = {"groups": 2, **kwargs}
    with pytest.raises(error, match=match):
        groupnorm.group_norm(X, **kwargs)
    with pytest.raises(error, match=match):  # the same under jit, at trace time
        jax.jit(lambda x: groupnorm.group_norm(x, **kwargs))(X)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64, jnp.uint8])
def test_non_floating_inputs_are_rejected(dtype: Any) -> None:
    with pytest.raises(TypeError, match="needs a floating-point input"):
        groupnorm.group_norm(jnp.zeros((2, 4, 4, 8), dtype), groups=2)


def test_undefined_channel_and_reduction_dimensions() -> None:
    """Under jax.export, symbolic dimensions are unknown until run time: the channel and reduction
    dimensions must be static. (A JAX array always has a known rank, so 'undefined rank' cannot arise.)"""
    fn = jax.jit(lambda x: groupnorm.group_norm(x, 2))
    with pytest.raises(ValueError, match="Input has undefined channel dimension"):
        export.export(fn)(jax.ShapeDtypeStruct(export.symbolic_shape("b, 4, 4, c"), jnp.float32))
    with pytest.raises(ValueError, match="Input has undefined dimensions along reduction axis -3"):
        export.export(fn)(jax.ShapeDtypeStruct(export.symbolic_shape("b, h, 4, 8"), jnp.float32))


def test_unsupported_types_name_jax() -> None:
    with pytest.raises(TypeError, match=r"jax\.Array"):
        groupnorm.group_norm([[1.0, 2.0]], groups=1)
