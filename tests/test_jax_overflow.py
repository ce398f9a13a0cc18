"""float32 input whose shifted squares overflow float32 (spread beyond about 1.8e19): the JAX backend and
the Flax front-ends still return the float64 reference's values and ``groupnorm.numpy.vjp``'s gradients,
finite, in both numerical modes, for small groups and for large ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import groupnorm
import groupnorm.flax as gflax
import groupnorm.flax.linen as glinen
import groupnorm.numpy as gnp
from support import hard_data, reference_group_norm

EPS = 1e-5
GROUPS = 4
#: (shape, mean over std): small groups, and groups of 16384 elements (a corner of 8 of 4096 positions)
SHAPES = {"small": ((2, 6, 5, 16), 0.0), "large": ((1, 64, 64, 16), 0.5)}

Grads = tuple[jax.Array, jax.Array, jax.Array]
FrontEnd = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, bool], tuple[jax.Array, Grads]]


def _functional(x: jax.Array, g: jax.Array, b: jax.Array, ct: jax.Array, mcz: bool) -> tuple[jax.Array, Grads]:
    def f(x: jax.Array, g: jax.Array, b: jax.Array) -> jax.Array:
        return groupnorm.group_norm(x, GROUPS, gamma=g, beta=b, epsilon=EPS, mean_close_to_zero=mcz)

    y, pullback = jax.vjp(jax.jit(f), x, g, b)
    dx, dg, db = pullback(ct)
    return y, (dx, dg, db)


def _nnx(x: jax.Array, g: jax.Array, b: jax.Array, ct: jax.Array, mcz: bool) -> tuple[jax.Array, Grads]:
    layer = gflax.GroupNorm(x.shape[-1], GROUPS, epsilon=EPS, mean_close_to_zero=mcz, rngs=nnx.Rngs(0))
    assert layer.scale is not None and layer.bias is not None
    layer.scale[...], layer.bias[...] = g, b
    y = layer(x)
    grads, dx = nnx.grad(lambda m, x: jnp.sum(m(x) * ct), argnums=(0, 1))(layer, x)
    return y, (dx, grads.scale[...], grads.bias[...])


def _linen(x: jax.Array, g: jax.Array, b: jax.Array, ct: jax.Array, mcz: bool) -> tuple[jax.Array, Grads]:
    module = glinen.GroupNorm(num_groups=GROUPS, epsilon=EPS, mean_close_to_zero=mcz)
    y, pullback = jax.vjp(lambda x, p: module.apply(p, x), x, {"params": {"scale": g, "bias": b}})
    dx, dp = pullback(ct)
    return y, (dx, dp["params"]["scale"], dp["params"]["bias"])


FRONT_ENDS: dict[str, FrontEnd] = {"group_norm": _functional, "flax.nnx": _nnx, "flax.linen": _linen}


def _check(front_end: str, x_np: np.ndarray, mcz: bool) -> None:
    c = x_np.shape[-1]
    rng = np.random.default_rng(5)
    ct_np = rng.standard_normal(x_np.shape).astype(np.float32)
    g_np, b_np = np.linspace(0.5, 2, c, dtype=np.float32), np.linspace(-1, 1, c, dtype=np.float32)
    y, grads = FRONT_ENDS[front_end](*(jnp.asarray(a) for a in (x_np, g_np, b_np, ct_np)), mcz)
    want = reference_group_norm(x_np, GROUPS, -1, (1, 2), g_np, b_np, EPS)
    assert bool(jnp.isfinite(y).all())
    assert np.abs(np.asarray(y, np.float64) - want).max() <= 1e-5
    ref = gnp.vjp(
        x_np.astype(np.float64), ct_np.astype(np.float64), GROUPS, -1, (1, 2),
        gamma=g_np.astype(np.float64), beta=b_np.astype(np.float64), epsilon=EPS,
    )  # fmt: skip
    for name, got, expected in zip(("x", "gamma", "beta"), grads, (ref.inputs, ref.gamma, ref.beta), strict=True):
        assert bool(jnp.isfinite(got).all()), name
        error = np.abs(np.asarray(got, np.float64) - expected).max()
        assert error <= 1e-5 * np.abs(expected).max(), (name, error, np.abs(expected).max())


@pytest.mark.parametrize("front_end", sorted(FRONT_ENDS))
@pytest.mark.parametrize("mean_close_to_zero", [False, True])
@pytest.mark.parametrize("scale", [1e15, 3e19, 1e30])
def test_float32_beyond_the_range_of_its_squares(front_end: str, mean_close_to_zero: bool, scale: float) -> None:
    shape, _ = SHAPES["small"]
    x = (scale * hard_data(shape, -1, 0.0, dtype=np.float64)).astype(np.float32)
    _check(front_end, x, mean_close_to_zero)


@pytest.mark.parametrize("scale", [3e19, 1e30])
def test_float32_beyond_the_range_of_its_squares_large_groups(scale: float) -> None:
    shape, mean_over_std = SHAPES["large"]
    x = (scale * hard_data(shape, -1, mean_over_std, dtype=np.float64)).astype(np.float32)
    _check("group_norm", x, False)


def test_only_some_groups_overflow() -> None:
    """One group's squares overflow, the others' are ordinary: each is exact."""
    shape, _ = SHAPES["small"]
    x = hard_data(shape, -1, 3.0, dtype=np.float64)
    x[..., :4] *= 1e30
    _check("group_norm", x.astype(np.float32), False)


def test_huge_values_beyond_the_corner() -> None:
    """Groups that are ordinary in their corner but hold huge values further on."""
    shape, _ = SHAPES["large"]
    x = hard_data(shape, -1, 1.0, dtype=np.float64)
    x[:, 40:, :, :] *= 1e30
    _check("group_norm", x.astype(np.float32), False)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_reduced_precision_near_its_range(dtype: Any) -> None:
    """bfloat16 has float32's range (statistics in float32 overflow there too); float16 up to 6e4."""
    shape, _ = SHAPES["small"]
    scale = 1e30 if dtype == jnp.bfloat16 else 1e4
    x = jnp.asarray(scale * hard_data(shape, -1, 0.0, dtype=np.float64), dtype)
    y = groupnorm.group_norm(x, GROUPS, epsilon=EPS)
    assert y.dtype == dtype
    want = reference_group_norm(np.asarray(x, np.float64), GROUPS, -1, (1, 2), None, None, EPS)
    assert np.abs(np.asarray(y, np.float64) - want).max() <= 2e-2


def test_vmap_with_one_example_beyond_the_range() -> None:
    """Under ``vmap``, an example whose squares overflow and ordinary ones: each as on its own."""
    shape, _ = SHAPES["small"]
    x = hard_data((3, *shape[1:]), -1, 2.0, dtype=np.float64)
    x[1] *= 1e30
    x32 = x.astype(np.float32)
    y = jax.vmap(lambda xi: groupnorm.group_norm(xi, GROUPS, epsilon=EPS))(jnp.asarray(x32))
    want = reference_group_norm(x32, GROUPS, -1, (1, 2), None, None, EPS)
    assert np.abs(np.asarray(y, np.float64) - want).max() <= 1e-5
