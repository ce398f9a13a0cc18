"""The NumPy backend against the independent float64 reference: values, hard data, edge cases, gradients."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings

import groupnorm
from groupnorm.numpy import forward, vjp
from support import NAMED_CONFIGS, Config, configs, hard_data, reference_group_norm


def run(cfg: Config, arrays: dict) -> np.ndarray:
    return groupnorm.group_norm(arrays["x"], gamma=arrays["gamma"], beta=arrays["beta"], **cfg.kwargs())


# -- values ----------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(configs())
def test_random_configurations_float64(cfg):
    a = cfg.arrays(np.float64)
    np.testing.assert_allclose(run(cfg, a), cfg.reference(a["x"], a["gamma"], a["beta"]), rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(configs())
def test_random_configurations_float32(cfg):
    # float32 one-pass sums are inexact by design (see the one-pass tests); this checks the stable mode.
    cfg = dataclasses.replace(cfg, mean_close_to_zero=False)
    a = cfg.arrays(np.float32)
    y = run(cfg, a)
    assert y.dtype == np.float32 and y.shape == cfg.shape
    np.testing.assert_allclose(y, cfg.reference(a["x"], a["gamma"], a["beta"]), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", sorted(NAMED_CONFIGS))
def test_named_configurations(name):
    cfg = NAMED_CONFIGS[name]
    a = cfg.arrays(np.float64)
    np.testing.assert_allclose(run(cfg, a), cfg.reference(a["x"], a["gamma"], a["beta"]), rtol=1e-10, atol=1e-10)


def test_non_contiguous_inputs():
    x = hard_data((2, 8, 5, 6), 1, 3.0, dtype=np.float64)
    nhwc = x.transpose(0, 2, 3, 1)  # a strided view
    y = groupnorm.group_norm(nhwc, 4, channels_axis=-1, reduction_axes=(1, 2))
    np.testing.assert_allclose(y, reference_group_norm(nhwc, 4, -1, (1, 2)), atol=1e-10)
    every_other = x[:, :, ::2, ::-1]
    y = groupnorm.group_norm(every_other, 4, channels_axis=1, reduction_axes=(2, 3))
    np.testing.assert_allclose(y, reference_group_norm(every_other, 4, 1, (2, 3)), atol=1e-10)


def test_callable_activation_is_applied_to_the_output():
    x = hard_data((2, 4, 4, 8), -1, 0.0, dtype=np.float32)
    y = groupnorm.group_norm(x, 4, activation_fn=np.tanh)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, np.tanh(reference_group_norm(x, 4)), atol=1e-5)


def test_forward_accepts_array_likes():
    x = [[1.0, 2.0, 3.0, 5.0], [0.0, -1.0, 4.0, 4.0]]
    np.testing.assert_allclose(forward(x, 2, reduction_axes=()), reference_group_norm(x, 2, -1, ()), atol=1e-12)


# -- accuracy on hard data ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mean_over_std", [0.0, 1e2, 1e4])
@pytest.mark.parametrize(
    ("shape", "c", "axes"),
    [((4, 16, 16, 64), -1, (-3, -2)), ((4, 64, 16, 16), 1, (2, 3)), ((16, 16, 64), -1, (0, 1))],
)
def test_float32_stable_variance_is_exact_at_large_means(mean_over_std, shape, c, axes):
    x = hard_data(shape, c, mean_over_std, dtype=np.float32)
    y = groupnorm.group_norm(x, 32, channels_axis=c, reduction_axes=axes)
    error = np.abs(y - reference_group_norm(x, 32, c, axes)).max()
    assert error <= 1e-5, error


def test_float32_large_mean_with_affine_parameters_and_small_spread():
    x = hard_data((4, 16, 16, 64), -1, 1e4, std=1e-2, dtype=np.float32)
    rng = np.random.default_rng(1)
    gamma, beta = rng.normal(1, 0.3, 64).astype(np.float32), rng.normal(0, 1, 64).astype(np.float32)
    y = groupnorm.group_norm(x, 32, gamma=gamma, beta=beta, epsilon=0.0)
    error = np.abs(y - reference_group_norm(x, 32, gamma=gamma, beta=beta, epsilon=0.0)).max()
    assert error <= 1e-5, error


@pytest.mark.parametrize("mean_over_std", [0.0, 1e2, 1e4, 1e6])
def test_one_pass_mode_never_returns_nan(mean_over_std):
    x = hard_data((4, 8, 8, 32), -1, mean_over_std, dtype=np.float32)
    y = groupnorm.group_norm(x, 8, mean_close_to_zero=True)
    assert np.isfinite(y).all()


def test_one_pass_mode_is_accurate_when_the_mean_is_small():
    x = hard_data((4, 8, 8, 32), -1, 1e-3, dtype=np.float32)
    y = groupnorm.group_norm(x, 8, mean_close_to_zero=True)
    assert np.abs(y - reference_group_norm(x, 8)).max() <= 1e-5


def test_one_pass_mode_matches_the_reference_in_float64():
    x = hard_data((2, 4, 4, 8), -1, 10.0, dtype=np.float64)
    np.testing.assert_allclose(
        groupnorm.group_norm(x, 4, mean_close_to_zero=True), reference_group_norm(x, 4), atol=1e-9
    )


@pytest.mark.parametrize("mean_close_to_zero", [False, True])
def test_float16_near_its_range(mean_close_to_zero):
    rng = np.random.default_rng(0)
    x = rng.uniform(3e4, 6e4, size=(2, 8, 8, 16)).astype(np.float16)  # x**2 overflows float16
    y = groupnorm.group_norm(x, 4, mean_close_to_zero=mean_close_to_zero)
    assert y.dtype == np.float16 and np.isfinite(y).all()
    # float16 output carries ~3 significant digits: |y| <= 2 here, so 2e-3 is a few ulps.
    assert np.abs(y.astype(np.float64) - reference_group_norm(x, 4)).max() <= 4e-3


def test_bfloat16_statistics_accumulate_in_float32():
    rng = np.random.default_rng(0)
    x = (rng.normal(0, 1, size=(2, 64, 64, 8)) + 100).astype(ml_dtypes.bfloat16)
    y = groupnorm.group_norm(x, 2)
    assert y.dtype == ml_dtypes.bfloat16
    # bfloat16 output has 8 significant bits: within ~2 ulps of |y| <= 4.
    assert np.abs(y.astype(np.float64) - reference_group_norm(x.astype(np.float64), 2)).max() <= 0.05


# -- edge cases ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "c", "axes"), [((0, 4, 4, 8), -1, (1, 2)), ((2, 0, 4, 8), -1, (1, 2)), ((2, 8, 0), 1, (2,))]
)
def test_zero_size_inputs(shape, c, axes):
    x = np.zeros(shape, np.float32)
    y = groupnorm.group_norm(x, 4, channels_axis=c, reduction_axes=axes)
    assert y.shape == shape and y.dtype == np.float32
    grads = vjp(x, np.zeros(shape, np.float32), 4, c, axes, gamma=np.ones(8, np.float32))
    assert grads.inputs.shape == shape and grads.gamma.shape == (8,)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("mean_close_to_zero", [False, True])
def test_non_finite_values_stay_in_their_group(bad, mean_close_to_zero):
    x = hard_data((3, 4, 4, 8), -1, 1.0, dtype=np.float32)
    x[1, 2, 3, 5] = bad  # batch 1, group 2 (channels 4, 5)
    y = groupnorm.group_norm(x, 4, mean_close_to_zero=mean_close_to_zero)
    poisoned = np.zeros(y.shape, bool)
    poisoned[1, :, :, 4:6] = True
    assert np.isfinite(y[~poisoned]).all()
    with np.errstate(invalid="ignore"):
        reference = reference_group_norm(x, 4)
    np.testing.assert_allclose(y[~poisoned], reference[~poisoned], atol=1e-5)
    assert not np.isfinite(y[poisoned]).any()


def test_constant_groups_give_beta_not_nan():
    x = np.full((2, 3, 3, 4), 7.25, np.float32)
    beta = np.arange(4, dtype=np.float32)
    y = groupnorm.group_norm(x, 2, beta=beta)
    np.testing.assert_array_equal(y, np.broadcast_to(beta, x.shape))


def test_inputs_are_never_modified():
    cfg = Config((2, 4, 4, 8), 4, -1, (1, 2), activation="silu")
    a = cfg.arrays(np.float32)
    before = {k: v.copy() for k, v in a.items()}
    run(cfg, a)
    vjp(a["x"], a["cotangent"], gamma=a["gamma"], beta=a["beta"], **cfg.kwargs())
    for k, v in a.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_output_never_aliases_the_input():
    x = hard_data((2, 2, 2, 4), -1, 1.0, dtype=np.float32)
    assert not np.shares_memory(groupnorm.group_norm(x, 2), x)


# -- gradients -----------------------------------------------------------------------------------------------


def numeric_gradients(cfg: Config, a: dict, h: float = 1e-6) -> dict[str, np.ndarray]:
    """Central finite differences of sum(reference(x, gamma, beta) * cotangent)."""

    def loss(x, gamma, beta):
        return float(np.sum(cfg.reference(x, gamma, beta) * a["cotangent"]))

    grads = {}
    for name in ("x", "gamma", "beta"):
        if a[name] is None:
            continue
        value = a[name]
        grad = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            args = {k: a[k] for k in ("x", "gamma", "beta")}
            plus, minus = value.copy(), value.copy()
            plus[i] += h
            minus[i] -= h
            grad[i] = (loss(**{**args, name: plus}) - loss(**{**args, name: minus})) / (2 * h)
        grads[name] = grad
    return grads


def check_vjp(cfg: Config) -> None:
    a = cfg.arrays(np.float64)
    got = vjp(a["x"], a["cotangent"], gamma=a["gamma"], beta=a["beta"], **cfg.kwargs())
    want = numeric_gradients(cfg, a)
    np.testing.assert_allclose(got.inputs, want["x"], rtol=1e-5, atol=1e-6)
    if cfg.affine:
        np.testing.assert_allclose(got.gamma, want["gamma"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.beta, want["beta"], rtol=1e-5, atol=1e-6)
    else:
        assert got.gamma is None and got.beta is None


@pytest.mark.parametrize("name", sorted(NAMED_CONFIGS))
def test_vjp_matches_finite_differences(name):
    check_vjp(NAMED_CONFIGS[name])


@settings(max_examples=30, deadline=None)
@given(configs(max_rank=4, max_size=3))
def test_vjp_matches_finite_differences_on_random_configurations(cfg):
    check_vjp(cfg)


def test_vjp_errors():
    x = np.ones((2, 4), np.float32)
    with pytest.raises(TypeError, match=r"not a callable"):
        vjp(x, x, 2, reduction_axes=(), activation_fn=np.tanh)
    with pytest.raises(ValueError, match=r"cotangent must have the input's shape"):
        vjp(x, x[:1], 2, reduction_axes=())
    with pytest.raises(ValueError, match=r"Invalid groups 8 for 4 channels."):
        vjp(x, x, 8, reduction_axes=())


def test_vjp_keeps_dtypes():
    cfg = NAMED_CONFIGS["nhwc"]
    a = cfg.arrays(np.float32)
    got = vjp(a["x"], a["cotangent"], gamma=a["gamma"], beta=a["beta"].astype(np.float64), **cfg.kwargs())
    assert (got.inputs.dtype, got.gamma.dtype, got.beta.dtype) == (np.float32, np.float32, np.float64)


@pytest.mark.parametrize("mean_close_to_zero", [False, True])
@pytest.mark.parametrize("scale", [3e19, 1e30])
def test_float32_beyond_the_range_of_its_squares(scale: float, mean_close_to_zero: bool) -> None:
    """Squares of float32 values beyond about 1.8e19 overflow float32; the result still exists."""
    x = (scale * hard_data((2, 6, 5, 16), -1, 0.0, dtype=np.float64)).astype(np.float32)
    dy = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    gamma = np.linspace(0.5, 2, 16).astype(np.float32)
    kwargs = {"groups": 4, "mean_close_to_zero": mean_close_to_zero}
    y = groupnorm.group_norm(x, gamma=gamma, **kwargs)
    assert y.dtype == np.float32
    want = reference_group_norm(x, 4, -1, (-3, -2), gamma, None, 1e-3)
    assert np.abs(y.astype(np.float64) - want).max() <= 1e-5
    got = vjp(x, dy, gamma=gamma, **kwargs)
    exact = vjp(x.astype(np.float64), dy.astype(np.float64), gamma=gamma.astype(np.float64), **kwargs)
    for a, b in ((got.inputs, exact.inputs), (got.gamma, exact.gamma)):
        assert a is not None and b is not None and np.isfinite(a).all()
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
