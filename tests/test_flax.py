"""The Flax drop-ins: ``groupnorm.flax.GroupNorm`` (NNX) and ``groupnorm.flax.linen.GroupNorm`` take Flax's
constructor arguments with the same defaults and parameter names, give Flax's results where Flax is
accurate and the reference's where it is not, and add the contract's arguments."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import groupnorm.flax as gflax
import groupnorm.flax.linen as glinen
import groupnorm.numpy as gnp
from fetch_upstream import require
from masked_support import masked_reference, masked_reference_grads
from support import Config, hard_data, reference_group_norm, run_python

TESTS = Path(__file__).resolve().parent


def _x(shape: tuple[int, ...] = (2, 4, 5, 8), mean_over_std: float = 0.5, seed: int = 0) -> jax.Array:
    return jnp.asarray(hard_data(shape, -1, mean_over_std, seed=seed))


def _random_params(layer: Any, seed: int = 1) -> None:
    """Give an NNX layer's scale and bias random values, so that comparisons see them."""
    rng = np.random.default_rng(seed)
    for name in ("scale", "bias"):
        p = getattr(layer, name)
        if p is not None:
            p[...] = jnp.asarray(rng.normal(size=p.shape), p.dtype)


def _defaults(fn: Any) -> dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if k != "self"}


def test_nnx_signature_is_flax_superset_with_same_defaults() -> None:
    theirs, ours = _defaults(nnx.GroupNorm.__init__), _defaults(gflax.GroupNorm.__init__)
    assert list(ours)[: len(theirs)] == list(theirs)
    for name, default in theirs.items():
        if not callable(default):
            assert ours[name] == default, name
    assert {k: ours[k] for k in list(ours)[len(theirs) :]} == {
        "channels_axis": -1,
        "activation": None,
        "mean_close_to_zero": False,
    }
    # the default initializers initialize as Flax's do
    a, b = nnx.GroupNorm(8, 4, rngs=nnx.Rngs(0)), gflax.GroupNorm(8, 4, rngs=nnx.Rngs(0))
    sa, sb = nnx.to_pure_dict(nnx.state(a)), nnx.to_pure_dict(nnx.state(b))
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(np.asarray(sa[k]), np.asarray(sb[k]))


def test_linen_fields_are_flax_superset_with_same_defaults() -> None:
    theirs = {f: getattr(nn.GroupNorm, f) for f in nn.GroupNorm.__dataclass_fields__ if f not in ("parent", "name")}
    for name, default in theirs.items():
        assert getattr(glinen.GroupNorm, name) == default, name
    assert (glinen.GroupNorm.channels_axis, glinen.GroupNorm.activation, glinen.GroupNorm.mean_close_to_zero) == (
        -1,
        None,
        False,
    )


NNX_CASES: list[dict[str, Any]] = [
    {"num_features": 8, "num_groups": 4},
    {"num_features": 8, "num_groups": None, "group_size": 2},
    {"num_features": 8, "num_groups": 2, "use_scale": False},
    {"num_features": 8, "num_groups": 8, "use_bias": False, "epsilon": 1e-3},
    {"num_features": 8, "num_groups": 2, "reduction_axes": (1, 2, 3)},
    {"num_features": 8, "num_groups": 2, "reduction_axes": (-2, -1)},
    {"num_features": 8, "num_groups": 4, "dtype": jnp.bfloat16},
    {"num_features": 8, "num_groups": 4, "param_dtype": jnp.bfloat16},
    {"num_features": 8, "num_groups": 4, "use_fast_variance": False},
]


@pytest.mark.parametrize("kwargs", NNX_CASES, ids=str)
def test_nnx_matches_flax_and_takes_its_parameters(kwargs: dict[str, Any]) -> None:
    theirs = nnx.GroupNorm(**kwargs, rngs=nnx.Rngs(0))
    _random_params(theirs)
    ours = gflax.GroupNorm(**kwargs, rngs=nnx.Rngs(0))
    nnx.update(ours, nnx.state(theirs))  # Flax's parameters load as they are
    assert {k for k, _ in nnx.to_flat_state(nnx.state(ours, nnx.Param))} == {
        k for k, _ in nnx.to_flat_state(nnx.state(theirs, nnx.Param))
    }
    x = _x()
    want, got = theirs(x), ours(x)
    assert got.dtype == want.dtype
    tol = 2e-2 if want.dtype == jnp.bfloat16 else 2e-5
    groups = 8 // kwargs["group_size"] if kwargs["num_groups"] is None else kwargs["num_groups"]
    axes = tuple(a for a in kwargs.get("reduction_axes", (1, 2)) if a % 4 != 3)
    params = [None if p is None else np.asarray(p[...], np.float64) for p in (theirs.scale, theirs.bias)]
    reference = reference_group_norm(np.asarray(x), groups, -1, axes, *params, kwargs.get("epsilon", 1e-6))
    np.testing.assert_allclose(np.asarray(got, np.float32), reference, atol=tol, rtol=tol)
    if axes == (1, 2):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
    else:
        # Flax NNX's own layer spreads the statistics along axis 1 instead of the channels when the
        # reduction axes are not all the middle axes: it is wrong here, and groupnorm is not.
        assert not np.allclose(np.asarray(want, np.float32), reference, atol=0.1)


LINEN_CASES: list[dict[str, Any]] = [
    {"num_groups": 4},
    {"num_groups": None, "group_size": 4},
    {"num_groups": 2, "use_bias": False},
    {"num_groups": 2, "use_scale": False, "reduction_axes": (-2, -1)},
    {"num_groups": 4, "dtype": jnp.bfloat16},
    {"num_groups": 4, "use_fast_variance": False, "force_float32_reductions": False},
]


@pytest.mark.parametrize("kwargs", LINEN_CASES, ids=str)
def test_linen_matches_flax_and_takes_its_parameters(kwargs: dict[str, Any]) -> None:
    x = _x()
    theirs, ours = nn.GroupNorm(**kwargs), glinen.GroupNorm(**kwargs)
    params = theirs.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + jnp.asarray(np.random.default_rng(2).normal(size=p.shape), p.dtype), params)
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(params)
    want, got = theirs.apply(params, x), ours.apply(params, x)
    assert got.dtype == want.dtype
    tol = 2e-2 if want.dtype == jnp.bfloat16 else 2e-5
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)


def _error(y: Any, x: Any, **kwargs: Any) -> float:
    return float(np.max(np.abs(np.asarray(y, np.float64) - reference_group_norm(np.asarray(x), **kwargs))))


def test_use_fast_variance_default_stays_exact_on_large_means() -> None:
    """Flax's default ``use_fast_variance=True`` is the one-pass variance; here it keeps the stable
    algorithm, so a group mean 1e4 x its spread stays within 1e-5 where Flax's layer is far off."""
    x = _x((2, 16, 16, 32), mean_over_std=1e4)
    ref_kwargs = {"groups": 8, "reduction_axes": (1, 2)}
    flax_error = _error(nnx.GroupNorm(32, 8, rngs=nnx.Rngs(0))(x), x, **ref_kwargs)
    assert flax_error > 1e-3  # more than 100 times the bound below: what the swap fixes
    fast, stable = (
        gflax.GroupNorm(32, 8, use_fast_variance=v, rngs=nnx.Rngs(0))(x) for v in (True, False)
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(stable))
    assert _error(fast, x, **ref_kwargs) <= 1e-5
    linen = glinen.GroupNorm(num_groups=8)
    assert _error(linen.apply(linen.init(jax.random.key(0), x), x), x, **ref_kwargs) <= 1e-5
    # the one-pass sums only when asked for by name, accurate where the mean is small
    small = _x((2, 16, 16, 32), mean_over_std=0.0)
    one_pass = gflax.GroupNorm(32, 8, mean_close_to_zero=True, rngs=nnx.Rngs(0))
    assert _error(one_pass(small), small, **ref_kwargs) <= 1e-5
    assert bool(jnp.all(jnp.isfinite(one_pass(x))))


def test_contract_arguments_channels_axis_free_reduction_axes_activation() -> None:
    # NCHW input: channel axis 1, statistics over H and W (the channel axis may be listed or not).
    x = jnp.asarray(hard_data((2, 8, 4, 5), 1, 3.0))
    for axes in ((2, 3), (1, 2, 3), None):
        layer = gflax.GroupNorm(8, 4, channels_axis=1, reduction_axes=axes, activation="silu", rngs=nnx.Rngs(0))
        _random_params(layer)
        g, b = np.asarray(layer.scale[...]), np.asarray(layer.bias[...])
        want = reference_group_norm(np.asarray(x), 4, 1, (2, 3), g, b, 1e-6, "silu")
        np.testing.assert_allclose(np.asarray(layer(x)), want, atol=2e-6)
    # (batch, time, channels) with statistics over time only: Flax insists on the last axis.
    seq = jnp.asarray(hard_data((3, 7, 6), -1, 3.0))
    layer = gflax.GroupNorm(6, 3, reduction_axes=(1,), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(layer(seq)), reference_group_norm(np.asarray(seq), 3, -1, (1,)), atol=2e-6)
    with pytest.raises(ValueError, match="must include the final dimension"):
        nn.GroupNorm(num_groups=3, reduction_axes=(1,)).init(jax.random.key(0), seq)
    lin = glinen.GroupNorm(num_groups=3, reduction_axes=(1,), activation=jnp.tanh)
    y = lin.apply(lin.init(jax.random.key(0), seq), seq)
    np.testing.assert_allclose(np.asarray(y), np.tanh(reference_group_norm(np.asarray(seq), 3, -1, (1,))), atol=2e-6)


def test_nnx_model_gradients_under_nnx_jit() -> None:
    class Model(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.norm = gflax.GroupNorm(8, 4, activation="gelu", rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.norm(x)

    model = Model(nnx.Rngs(0))
    _random_params(model.norm)
    x = _x()
    ct = jnp.asarray(np.random.default_rng(3).normal(size=x.shape), jnp.float32)
    grads = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) * ct)))(model, x)
    g, b = np.asarray(model.norm.scale[...]), np.asarray(model.norm.bias[...])
    ref = gnp.vjp(
        np.asarray(x, np.float64), np.asarray(ct, np.float64), 4, -1, (1, 2),
        gamma=g.astype(np.float64), beta=b.astype(np.float64), activation_fn="gelu",
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(grads.norm.scale[...]), ref.gamma, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grads.norm.bias[...]), ref.beta, rtol=1e-4, atol=1e-4)


def test_errors() -> None:
    with pytest.raises(ValueError, match="Either `num_groups` or `group_size`"):
        gflax.GroupNorm(8, 4, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Either `num_groups` or `group_size`"):
        gflax.GroupNorm(8, None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not multiple of the group size"):
        gflax.GroupNorm(8, None, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"8 channels is not commensurate with 3 groups\."):
        gflax.GroupNorm(8, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"Invalid groups 16 for 8 channels\."):
        gflax.GroupNorm(8, 16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Unknown activation"):
        gflax.GroupNorm(8, 4, activation="tanh", rngs=nnx.Rngs(0))
    layer = gflax.GroupNorm(8, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="must be None or a boolean array"):
        layer(_x(), mask=jnp.ones((2, 4, 5, 8), jnp.int32))  # jnp's own words, where Flax's mean raises
    with pytest.raises(ValueError, match="does not broadcast"):
        layer(_x(), mask=jnp.ones((2, 4, 5, 4), bool))
    with pytest.raises(ValueError, match=r"Axis is out of bounds\."):
        gflax.GroupNorm(8, 4, reduction_axes=(1, 4), rngs=nnx.Rngs(0))(_x())
    with pytest.raises(ValueError, match=r"8 channels is not commensurate with 3 groups\."):
        glinen.GroupNorm(num_groups=3).init(jax.random.key(0), _x())
    with pytest.raises(ValueError, match="Either `num_groups` or `group_size`"):
        glinen.GroupNorm(num_groups=None).init(jax.random.key(0), _x())
    with pytest.raises(ValueError, match=r"Axis is out of bounds\."):
        glinen.GroupNorm(num_groups=4, channels_axis=4).init(jax.random.key(0), _x())


@pytest.mark.parametrize(
    ("make", "groups", "phrase"),
    [
        (lambda g: gflax.GroupNorm(8, g, rngs=nnx.Rngs(0)), 3, r"8 channels is not commensurate with 3 groups\."),
        (lambda g: gflax.GroupNorm(8, g, rngs=nnx.Rngs(0)), 16, r"Invalid groups 16 for 8 channels\."),
        (lambda g: gflax.GroupNorm(8, g, rngs=nnx.Rngs(0)), 0, "groups must be a positive int"),
        (lambda g: gflax.GroupNorm(8, g, rngs=nnx.Rngs(0)), 1.5, "groups must be a positive int"),
        (lambda g: gflax.GroupNorm(8, g, rngs=nnx.Rngs(0)), "4", "groups must be a positive int"),
        (lambda g: glinen.GroupNorm(num_groups=g).init(jax.random.key(0), _x()), 3, "commensurate"),
        (lambda g: glinen.GroupNorm(num_groups=g).init(jax.random.key(0), _x()), -1, "positive int"),
        (lambda g: glinen.GroupNorm(num_groups=g).init(jax.random.key(0), _x()), 2.0, "positive int"),
    ],
)
def test_group_errors_are_value_errors_in_flax_words(make: Any, groups: Any, phrase: str) -> None:
    """Where Flax raises ValueError ("does not divide the number of channels"), so does groupnorm, with
    Flax's phrase after the contract's; the class is a TypeError too, as the plan's type errors are."""
    with pytest.raises(ValueError, match=phrase) as info:
        make(groups)
    assert isinstance(info.value, TypeError)
    assert f"Number of groups ({groups}) does not divide the number of channels (8)." in str(info.value)


@pytest.mark.parametrize("groups", [3, 16, 0, 1.5, "4"])
def test_flax_raises_value_error_for_those_groups(groups: Any) -> None:
    """What the test above matches: Flax's own layer, for the same groups."""
    with pytest.raises(ValueError, match=f"Number of groups \\({groups}\\) does not divide the number of channels"):
        nnx.GroupNorm(8, groups, rngs=nnx.Rngs(0))


def test_group_size_errors_name_features_and_channels_as_flax_does() -> None:
    with pytest.raises(ValueError, match=r"Number of features \(8\) is not multiple of the group size \(3\)"):
        gflax.GroupNorm(8, None, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"Number of channels \(8\) is not multiple of the group size \(3\)"):
        glinen.GroupNorm(num_groups=None, group_size=3).init(jax.random.key(0), _x())


# -- masks ---------------------------------------------------------------------------------------------


def _layers_with_mask(
    x: jax.Array, mask: Any, *, with_flax: bool = True, **kwargs: Any
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """NNX and Linen groupnorm, and Flax's NNX GroupNorm (unless not ``with_flax``), on (x, mask) with
    the same random parameters."""
    channels = x.shape[-1]
    ours = gflax.GroupNorm(channels, rngs=nnx.Rngs(0), **kwargs)
    _random_params(ours)
    theirs = nnx.GroupNorm(channels, rngs=nnx.Rngs(0), **kwargs)
    theirs.scale[...], theirs.bias[...] = ours.scale[...], ours.bias[...]
    linen = glinen.GroupNorm(**kwargs)
    params = {"params": {"scale": ours.scale[...], "bias": ours.bias[...]}}
    return ours(x, mask=mask), linen.apply(params, x, mask=mask), theirs(x, mask=mask) if with_flax else None


@pytest.mark.parametrize(
    ("shape", "kwargs", "mask_shape", "axes", "with_flax"),
    [
        ((2, 4, 5, 8), {"num_groups": 4}, (2, 4, 5, 8), (1, 2), True),
        # per pixel, broadcast over the channels: Flax's reshape of the mask needs the full channel axis
        ((2, 4, 5, 8), {"num_groups": 2}, (2, 4, 5, 1), (1, 2), False),
        ((3, 7, 6), {"num_groups": 3}, (3, 7, 6), (1,), True),
        ((3, 7, 6), {"num_groups": None, "group_size": 1}, (7, 6), (1,), True),
        # time kept: Flax's NNX layer repeats its statistics along axis 1, right only where that is batch
        ((3, 2, 4, 4, 6), {"num_groups": 3, "reduction_axes": (2, 3, 4)}, (3, 2, 4, 4, 6), (2, 3), False),
    ],
)
def test_mask_matches_flax_and_the_reference(
    shape: tuple[int, ...],
    kwargs: dict[str, Any],
    mask_shape: tuple[int, ...],
    axes: tuple[int, ...],
    with_flax: bool,
) -> None:
    x = _x(shape, mean_over_std=0.5, seed=4)
    mask = np.random.default_rng(5).random(mask_shape) < 0.6
    mask[(slice(None),) * (len(mask_shape) - 1) + (0,)] = True  # every group has an unmasked element
    m = jnp.asarray(mask)
    ours, linen, theirs = _layers_with_mask(x, m, with_flax=with_flax, **kwargs)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(linen))
    if theirs is not None:
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=2e-5)
    groups = kwargs["num_groups"] or shape[-1]
    layer = gflax.GroupNorm(shape[-1], rngs=nnx.Rngs(0), **kwargs)
    cfg = Config(shape, groups, -1, axes, epsilon=1e-6)
    want = masked_reference(cfg, np.asarray(x), mask)["y"]
    np.testing.assert_allclose(np.asarray(layer(x, mask=m)), want, atol=2e-5)


def test_mask_stays_exact_where_flax_loses_precision() -> None:
    x = _x((2, 6, 6, 8), mean_over_std=1e4, seed=6)
    mask = np.random.default_rng(7).random((2, 6, 6, 8)) < 0.5
    cfg = Config((2, 6, 6, 8), 4, -1, (1, 2), epsilon=1e-6)
    want = masked_reference(cfg, np.asarray(x), mask)["y"]
    ours = gflax.GroupNorm(8, 4, rngs=nnx.Rngs(0))(x, mask=jnp.asarray(mask))
    theirs = nnx.GroupNorm(8, 4, rngs=nnx.Rngs(0))(x, mask=jnp.asarray(mask))
    assert np.abs(np.asarray(theirs) - want).max() > 1e-3  # Flax's one-pass variance
    np.testing.assert_allclose(np.asarray(ours), want, atol=1e-5)


def test_mask_gradients_under_nnx_jit() -> None:
    x = _x((3, 5, 6), mean_over_std=2.0, seed=8)
    mask = np.random.default_rng(9).random((3, 5, 1)) < 0.6
    mask[:, 0] = True
    ct = jnp.asarray(np.random.default_rng(10).normal(size=x.shape), jnp.float32)
    model = gflax.GroupNorm(6, 3, activation="silu", epsilon=1e-5, rngs=nnx.Rngs(0))
    _random_params(model)

    @nnx.jit
    def grads(m: gflax.GroupNorm, xx: jax.Array) -> Any:
        return nnx.grad(lambda mm, z: jnp.sum(mm(z, mask=jnp.asarray(mask)) * ct), argnums=(0, 1))(m, xx)

    gm, gx = grads(model, x)
    g, b = np.asarray(model.scale[...]), np.asarray(model.bias[...])
    cfg = Config((3, 5, 6), 3, -1, (1,), activation="silu", epsilon=1e-5)
    want = masked_reference_grads(cfg, np.asarray(x), mask, np.asarray(ct), g, b)
    np.testing.assert_allclose(np.asarray(gx), want["x"], atol=1e-4)
    np.testing.assert_allclose(np.asarray(gm.scale[...]), want["gamma"], atol=1e-4)
    np.testing.assert_allclose(np.asarray(gm.bias[...]), want["beta"], atol=1e-4)


def test_group_without_unmasked_elements_gives_bias_where_flax_gives_nan() -> None:
    x = _x((2, 3, 4), seed=11)
    mask = np.ones((2, 3, 4), bool)
    mask[1, :, 2:] = False  # example 1, group 1: nothing to take statistics of
    ours, linen, theirs = _layers_with_mask(x, jnp.asarray(mask), num_groups=2)
    assert theirs is not None and np.isnan(np.asarray(theirs)[1, :, 2:]).all()
    _random_params(layer := gflax.GroupNorm(4, 2, rngs=nnx.Rngs(0)))  # the parameters _layers_with_mask gave
    bias = np.asarray(layer.bias[...])
    np.testing.assert_allclose(np.asarray(ours)[1, :, 2:], np.broadcast_to(bias[2:], (3, 2)), atol=1e-7)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(linen))
    np.testing.assert_allclose(np.asarray(ours)[0], np.asarray(theirs)[0], atol=2e-5)


# -- Flax's own tests ----------------------------------------------------------------------------------


def test_flax_own_group_norm_tests_pass_with_groupnorm_layers() -> None:
    """Flax's tests/nnx/nn/normalization_test.py (groupnorm cases) and tests/linen/linen_test.py (GroupNorm
    cases), unchanged, with ``nnx.GroupNorm`` and ``linen.GroupNorm`` swapped for groupnorm's."""
    nnx_file, linen_file = require("flax-nnx"), require("flax-linen")
    result = run_python(str(TESTS / "upstream_check.py"), f"flax-nnx={nnx_file}", f"flax-linen={linen_file}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("UPSTREAM "))
    results = json.loads(line.removeprefix("UPSTREAM "))
    for suite, file in (("flax-nnx", nnx_file), ("flax-linen", linen_file)):
        assert results[suite]["failed"] == {}, "\n\n".join(results[suite]["failed"].values())
        passed = results[suite]["passed"]
        # every GroupNorm test method of the file ran (parameterized ones as numbered cases)
        names = {n for n in _test_methods(file) if "group_norm" in n or "groupnorm" in n}
        assert names and all(any(p.startswith(n) for p in passed) for n in names), (names, passed)
    assert len(results["flax-nnx"]["passed"]) >= 16
    assert any(p.startswith("test_normalization_equivalence") for p in results["flax-linen"]["passed"])


def _test_methods(path: Path) -> list[str]:
    import re

    return re.findall(r"^\s+def (test\w+)\(", path.read_text(), flags=re.MULTILINE)
