"""``groupnorm.group_norm(..., mask=...)`` on every library (NumPy, PyTorch, JAX, TensorFlow): statistics
over the unmasked elements only, against a float64 reference that drops the masked elements, with
gradients from each library's autodiff against the reference's derivation; hard data, empty groups,
NaN under the mask, and the mask's errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import torch

import groupnorm
from groupnorm._masked import masked_group_norm, ops_for
from groupnorm._plan import MaskError, make_plan
from masked_support import masked_reference, masked_reference_grads
from support import NAMED_CONFIGS, Config, hard_data, reference_activation

LIBRARIES = ("numpy", "torch", "jax", "tensorflow")


# -- running each library ------------------------------------------------------------------------------


def run(
    library: str, cfg: Config, x: np.ndarray, mask: Any, gamma: Any, beta: Any, cot: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray | None] | None]:
    """group_norm with ``mask`` on ``library``, and (``cot`` given, not NumPy) the gradients of
    sum(y * cot) with that library's autodiff."""
    kwargs = cfg.kwargs()
    if library == "numpy":
        return np.asarray(groupnorm.group_norm(x, mask=mask, gamma=gamma, beta=beta, **kwargs)), None
    if library == "torch":
        tensors = [None if a is None else torch.tensor(a, requires_grad=cot is not None) for a in (x, gamma, beta)]
        tx, tg, tb = tensors
        y = groupnorm.group_norm(tx, mask=torch.as_tensor(mask), gamma=tg, beta=tb, **kwargs)
        if cot is None:
            return y.detach().numpy(), None
        (y * torch.tensor(cot)).sum().backward()
        grads = {k: None if t is None else t.grad.numpy() for k, t in zip(("x", "gamma", "beta"), tensors, strict=True)}
        return y.detach().numpy(), grads
    if library == "jax":

        def f(xx: Any, gg: Any, bb: Any) -> Any:
            return groupnorm.group_norm(xx, mask=jnp.asarray(mask), gamma=gg, beta=bb, **kwargs)

        args = [None if a is None else jnp.asarray(a) for a in (x, gamma, beta)]
        if cot is None:
            return np.asarray(f(*args)), None
        y, pullback = jax.vjp(f, *args)
        g = pullback(jnp.asarray(cot))
        return np.asarray(y), {
            k: None if v is None else np.asarray(v) for k, v in zip(("x", "gamma", "beta"), g, strict=True)
        }
    variables = [None if a is None else tf.Variable(a) for a in (x, gamma, beta)]
    with tf.GradientTape() as tape:
        y = groupnorm.group_norm(
            tf.convert_to_tensor(variables[0]), mask=tf.constant(mask), gamma=variables[1], beta=variables[2], **kwargs
        )
        loss = tf.reduce_sum(y * cot) if cot is not None else None
    if cot is None:
        return y.numpy(), None
    present = [v for v in variables if v is not None]
    got = iter(tape.gradient(loss, present))
    grads = {
        k: None if v is None else next(got).numpy() for k, v in zip(("x", "gamma", "beta"), variables, strict=True)
    }
    return y.numpy(), grads


def _random_mask(shape: tuple[int, ...], seed: int, p: float = 0.6) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) < p


def _mask_shapes(cfg: Config) -> list[tuple[int, ...]]:
    """Masks that broadcast to the input: full, one per position (channel axis 1), per channel, trailing."""
    shape = cfg.shape
    c = cfg.channels_axis % len(shape)
    per_position = tuple(1 if i == c else d for i, d in enumerate(shape))
    return [shape, per_position, shape[1:], (1,) * len(shape)]


def _close(got: np.ndarray, want: np.ndarray, tol: float) -> None:
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(1.0, float(np.abs(want).max())))


# -- values and gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("name", sorted(NAMED_CONFIGS))
def test_matches_reference_that_drops_masked_elements(library: str, name: str) -> None:
    cfg = NAMED_CONFIGS[name]
    arrays = cfg.arrays(np.float32, mean_over_std=3.0)
    x, gamma, beta, cot = arrays["x"], arrays["gamma"], arrays["beta"], arrays["cotangent"]
    assert x is not None and cot is not None
    for i, mshape in enumerate(_mask_shapes(cfg)):
        mask = _random_mask(mshape, cfg.seed + i)
        y, grads = run(library, cfg, x, mask, gamma, beta, cot if i < 2 else None)
        ref = masked_reference(cfg, x, mask, gamma, beta)
        assert y.dtype == np.float32 and y.shape == x.shape
        _close(y, ref["y"], 2e-5)
        if grads is not None:
            want = masked_reference_grads(cfg, x, mask, cot, gamma, beta)
            for k in ("x", "gamma", "beta"):
                if want[k] is None:
                    assert grads[k] is None
                else:
                    _close(grads[k], want[k], 1e-4)  # type: ignore[arg-type]


@pytest.mark.parametrize("library", LIBRARIES)
def test_all_true_mask_equals_unmasked(library: str) -> None:
    cfg = NAMED_CONFIGS["nchw"]
    arrays = cfg.arrays(np.float32, mean_over_std=10.0)
    x, gamma, beta = arrays["x"], arrays["gamma"], arrays["beta"]
    y, _ = run(library, cfg, x, np.ones(cfg.shape, bool), gamma, beta)
    _close(y, cfg.reference(x, gamma, beta), 2e-5)


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("mean_close_to_zero", [False, True])
def test_large_mean_keeps_float32_accuracy(library: str, mean_close_to_zero: bool) -> None:
    cfg = Config((2, 6, 5, 8), 4, -1, (-3, -2), mean_close_to_zero=mean_close_to_zero)
    x = hard_data(cfg.shape, -1, 1e4 if not mean_close_to_zero else 0.1, std=3.0, seed=3)
    mask = _random_mask((2, 6, 5, 1), 4)
    y, _ = run(library, cfg, x, mask, None, None)
    np.testing.assert_allclose(y, masked_reference(cfg, x, mask)["y"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("library", LIBRARIES)
def test_spreads_beyond_float32_squares(library: str) -> None:
    cfg = Config((2, 4, 4, 4), 2, -1, (-3, -2), epsilon=1e-6)
    x = hard_data(cfg.shape, -1, 3.0, std=1e25, seed=5)
    mask = _random_mask(cfg.shape, 6)
    y, _ = run(library, cfg, x, mask, None, None)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, masked_reference(cfg, x, mask)["y"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("library", LIBRARIES)
def test_masked_values_never_reach_the_statistics(library: str) -> None:
    cfg = Config((3, 5, 6), 3, -1, (-2,))
    x = hard_data(cfg.shape, -1, 1.0, seed=7)
    mask = _random_mask(cfg.shape, 8)
    mask[:, 0, :] = True  # no empty group
    poisoned = np.where(mask, x, np.nan).astype(np.float32)
    y, _ = run(library, cfg, poisoned, mask, None, None)
    ref = masked_reference(cfg, x, mask)["y"]
    np.testing.assert_allclose(y[mask], ref[mask], rtol=0, atol=2e-5)
    assert np.isnan(y[~mask]).all()  # masked elements are normalized too (Flax's semantics)


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_without_unmasked_elements_gives_beta_and_no_gradient(library: str, activation: str | None) -> None:
    cfg = Config((2, 3, 4), 2, -1, (-2,), activation=activation)
    rng = np.random.default_rng(9)
    x = rng.standard_normal(cfg.shape).astype(np.float32)
    gamma = rng.standard_normal(4).astype(np.float32)
    beta = rng.standard_normal(4).astype(np.float32)
    mask = np.ones(cfg.shape, bool)
    mask[0, :, :2] = False  # example 0, group 0: nothing unmasked
    x[0, 1, 0] = np.nan  # and a NaN there, which must not show
    cot = rng.standard_normal(cfg.shape).astype(np.float32)
    y, grads = run(library, cfg, x, mask, gamma, beta, cot if library != "numpy" else None)
    assert not np.isnan(y).any()
    np.testing.assert_allclose(
        y[0, :, :2], reference_activation(activation, np.broadcast_to(beta[:2], (3, 2))), atol=1e-6
    )
    clean = np.nan_to_num(x)
    want = masked_reference(cfg, clean, mask, gamma, beta)["y"]
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-5)
    if grads is not None:
        assert grads["x"] is not None and not np.isnan(grads["x"]).any()
        np.testing.assert_array_equal(grads["x"][0, :, :2], 0)
        ref_grads = masked_reference_grads(cfg, clean, mask, cot, gamma, beta)
        _close(grads["x"], ref_grads["x"], 1e-4)  # type: ignore[arg-type]


@pytest.mark.parametrize("library", LIBRARIES)
def test_float16_input_accumulates_in_float32(library: str) -> None:
    cfg = Config((2, 4, 4, 8), 4, -1, (-3, -2), epsilon=1e-3)
    x = hard_data(cfg.shape, -1, 50.0, std=20.0, dtype=np.float16, seed=11)
    mask = _random_mask((4, 4, 1), 12)
    y, _ = run(library, cfg, x, mask, None, None)
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float64), masked_reference(cfg, x, mask)["y"], rtol=0, atol=4e-3)


@pytest.mark.parametrize("library", LIBRARIES)
def test_float64_input_is_exact_in_float64(library: str) -> None:
    cfg = Config((2, 5, 6), 3, -1, (-2,))
    x = hard_data(cfg.shape, -1, 1e8, dtype=np.float64, seed=13)
    mask = _random_mask(cfg.shape, 14)
    with jax.enable_x64(True):
        y, _ = run(library, cfg, x, mask, None, None)
    assert y.dtype == np.float64
    # a mean 1e8 against a spread of 1: float32 would keep no digit of the output
    _close(y, masked_reference(cfg, x, mask)["y"], 1e-12)


def test_callable_activation_and_inputs_unchanged() -> None:
    cfg = Config((2, 4, 6), 2, -1, (-2,))
    x = hard_data(cfg.shape, -1, 1.0, seed=15)
    mask = _random_mask(cfg.shape, 16)
    x_before, mask_before = x.copy(), mask.copy()
    y = groupnorm.group_norm(x, 2, reduction_axes=(-2,), epsilon=cfg.epsilon, mask=mask, activation_fn=np.tanh)
    np.testing.assert_allclose(y, np.tanh(masked_reference(cfg, x, mask)["y"]), atol=2e-6)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(mask, mask_before)


def test_jax_mask_under_jit_vmap_and_second_order() -> None:
    cfg = Config((3, 4, 6), 3, -1, (-2,))
    x = jnp.asarray(hard_data(cfg.shape, -1, 2.0, seed=17))
    mask = jnp.asarray(_random_mask(cfg.shape, 18))

    def f(xx: jax.Array, mm: jax.Array) -> jax.Array:
        return groupnorm.group_norm(xx, 3, reduction_axes=(-2,), epsilon=cfg.epsilon, mask=mm)

    ref = masked_reference(cfg, np.asarray(x), np.asarray(mask))["y"]
    np.testing.assert_allclose(jax.jit(f)(x, mask), ref, atol=2e-5)
    np.testing.assert_allclose(jax.vmap(f)(x, mask), ref, atol=2e-5)  # one example at a time: the same groups
    hvp = jax.jvp(jax.grad(lambda z: (f(z, mask) ** 3).sum()), (x,), (jnp.ones_like(x),))[1]
    assert np.isfinite(np.asarray(hvp)).all()


def test_tensorflow_mask_in_tf_function_with_dynamic_batch() -> None:
    cfg = Config((3, 4, 6), 3, -1, (-2,))
    x = hard_data(cfg.shape, -1, 2.0, seed=19)
    mask = _random_mask((3, 4, 1), 20)

    @tf.function(input_signature=[tf.TensorSpec([None, 4, 6]), tf.TensorSpec([None, 4, 1], tf.bool)])
    def f(xx: tf.Tensor, mm: tf.Tensor) -> tf.Tensor:
        return groupnorm.group_norm(xx, 3, reduction_axes=(-2,), epsilon=cfg.epsilon, mask=mm)

    np.testing.assert_allclose(f(x, mask).numpy(), masked_reference(cfg, x, mask)["y"], atol=2e-5)


def test_torch_mask_passes_gradcheck_in_float64() -> None:
    cfg = Config((2, 6, 5), 3, 1, (2,))  # NCL: channels first
    x = torch.tensor(hard_data(cfg.shape, 1, 2.0, seed=21), dtype=torch.float64, requires_grad=True)
    mask = torch.as_tensor(_random_mask((2, 1, 5), 22))
    assert torch.autograd.gradcheck(
        lambda t: groupnorm.group_norm(t, 3, 1, (2,), epsilon=1e-5, mask=mask), (x,), eps=1e-6, atol=1e-6
    )


# -- the function for front-ends -----------------------------------------------------------------------


def test_masked_group_norm_with_keras_ops() -> None:
    cfg = NAMED_CONFIGS["nhwc"]
    arrays = cfg.arrays(np.float32)
    x, gamma, beta = arrays["x"], arrays["gamma"], arrays["beta"]
    mask = _random_mask((2, 4, 5, 1), 23)
    plan = make_plan(x.shape, "float32", groups=cfg.groups, reduction_axes=cfg.reduction_axes, epsilon=cfg.epsilon)
    got = masked_group_norm(plan, tf.constant(x), mask, tf.constant(gamma), tf.constant(beta), None, ops_for("keras"))
    np.testing.assert_allclose(np.asarray(got), masked_reference(cfg, x, mask, gamma, beta)["y"], atol=2e-5)


# -- errors --------------------------------------------------------------------------------------------

MAKERS: dict[str, Callable[[np.ndarray], Any]] = {
    "numpy": np.asarray,
    "torch": torch.as_tensor,
    "jax": jnp.asarray,
    "tensorflow": tf.constant,
}


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize(
    ("mask", "phrase"),
    [
        (np.ones((2, 4, 6), np.int32), "must be None or a boolean array"),
        (np.ones((2, 4, 6), np.float32), "must be None or a boolean array"),
        (np.ones((2, 4, 5), bool), r"does not broadcast to the input's shape \[2, 4, 6\]"),
        (np.ones((3, 1, 1), bool), "does not broadcast"),
        (np.ones((1, 2, 4, 6), bool), "does not broadcast"),
    ],
)
def test_mask_errors(library: str, mask: np.ndarray, phrase: str) -> None:
    x = MAKERS[library](np.ones((2, 4, 6), np.float32))
    with pytest.raises(MaskError, match=phrase) as info:
        groupnorm.group_norm(x, 2, reduction_axes=(-2,), mask=MAKERS[library](mask))
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_contract_errors_come_first_with_a_mask() -> None:
    with pytest.raises(ValueError, match="commensurate"):
        groupnorm.group_norm(np.ones((2, 4, 6), np.float32), 4, reduction_axes=(-2,), mask=np.ones(6, bool))


@pytest.mark.parametrize("library", [*LIBRARIES, "keras"])
@pytest.mark.parametrize(("work", "top"), [("float32", 126), ("float64", 1022)])
def test_scale_factors_are_exact_powers_of_two(library: str, work: str, top: int) -> None:
    """The per-group scale 2**-e is exact (so scaling loses nothing), and e is floor(log2) of the
    largest |x| give or take one, never below 0 or above the dtype's range."""
    xp = ops_for(library)
    maker = {**MAKERS, "keras": tf.constant}[library]
    with jax.enable_x64(True):
        e = np.arange(0, top + 1).astype(work)
        np.testing.assert_array_equal(np.asarray(xp.pow2(maker(e), work)), 2.0 ** -e.astype(np.float64))
        big = np.array([0.0, 0.5, 1.0, 3.0, 1e4, 2.0**60 * 1.5, np.finfo(work).max], work)
        got = np.asarray(xp.exponent(maker(big), top))
    want = np.clip(np.floor(np.log2(np.maximum(big.astype(np.float64), 1.0))), 0, top)
    assert np.all(np.abs(got - want) <= 1) and got.min() >= 0 and got.max() <= top
