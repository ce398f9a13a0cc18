"""The one statement of the numerics (groupnorm._numerics) and the NumPy backend, its plain
transcription: the corner shift, the rescue and its triggers, against direct float64 computations; the
hard regimes drawn group by group; the cases that went wrong before."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import groupnorm
from groupnorm import _numerics as N
from groupnorm._plan import make_plan
from groupnorm.backends import numpy as np_backend
from groupnorm.backends._layout import channel_view
from groupnorm.numpy import vjp
from hard_regimes import check_hard, conditioning, group_rstd, hard_configs, hard_inputs, parameters
from support import Config, configs, hard_data, reference_group_norm


def groups_as_rows(x: np.ndarray, cfg: Config) -> np.ndarray:
    """(kept..., G, cg, R): every group's channels and its reduced positions flattened row-major."""
    rank = x.ndim
    c = cfg.channels_axis % rank
    reduced = sorted(a % rank for a in cfg.reduction_axes)
    kept = [a for a in range(rank) if a != c and a not in reduced]
    moved = np.transpose(x, [*kept, c, *reduced])
    return moved.reshape([x.shape[a] for a in kept] + [cfg.groups, x.shape[c] // cfg.groups, -1])


def rows_size(cfg: Config) -> int:
    rank = len(cfg.shape)
    return cfg.channels // cfg.groups * math.prod(cfg.shape[a % rank] for a in cfg.reduction_axes)


def per_group(values: np.ndarray, plan) -> np.ndarray:
    """A backend's per-group values (channel view) as (kept indices flattened, groups)."""
    view = channel_view(plan)
    return np.moveaxis(np.asarray(values, np.float64), view.channel, -1).reshape(-1, plan.groups)


def corner_shift_by_definition(x: np.ndarray, cfg: Config) -> np.ndarray:
    """K per group, in float64, straight from the definition: the mean over the group's channels of the
    first min(8, R) reduced positions."""
    rows = groups_as_rows(x.astype(np.float64), cfg)
    m = min(N.CORNER, rows.shape[-1])
    return rows[..., :m].mean(axis=(-2, -1))


@pytest.mark.parametrize(
    ("dims", "box", "size"),
    [((16, 16), (1, 8), 8), ((4, 5), (2, 5), 8), ((3, 3, 3), (1, 3, 3), 8), ((2, 2), (2, 2), 4), ((), (), 1)],
)
def test_corner_box(dims, box, size):
    spot = N.corner(dims)
    assert (spot.box, spot.size) == (box, size)
    positions = np.arange(math.prod(dims)).reshape(dims) if dims else np.zeros(())
    inside = positions[tuple(slice(0, b) for b in box)].reshape(-1)[:size]
    np.testing.assert_array_equal(np.sort(inside), np.arange(size))


@settings(max_examples=80, deadline=None)
@given(configs(max_rank=5, max_size=5))
def test_numpy_shift_is_the_corner_mean(cfg):
    x = hard_data(cfg.shape, cfg.channels_axis, 3.0, dtype=np.float64, seed=cfg.seed)
    plan = make_plan(x.shape, "float64", groups=cfg.groups, channels_axis=cfg.channels_axis,
                     reduction_axes=cfg.reduction_axes, epsilon=cfg.epsilon)  # fmt: skip
    stats = [per_group(s, plan) for s in np_backend.group_statistics(plan, x)]
    want = corner_shift_by_definition(x, cfg).reshape(-1, cfg.groups)
    # the statistics describe x * unit - shift
    shift, unit, mean, var = stats
    assert np.all(unit == 1)
    np.testing.assert_allclose(shift, want, rtol=1e-12, atol=1e-12)
    rows = groups_as_rows(x, cfg).reshape(-1, cfg.groups, rows_size(cfg))
    np.testing.assert_allclose(shift + mean, rows.mean(axis=-1), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(var, rows.var(axis=-1), rtol=1e-9, atol=1e-12)


def test_constant_corner_gives_its_value_exactly():
    x = np.full((1, 4, 4, 3), 1 + 2.0**-23, np.float32)  # a mean of 48 such values is not exact, K is
    plan = make_plan(x.shape, "float32", groups=3)
    stats = np_backend.group_statistics(plan, x)
    assert np.all(stats.shift == x[0, 0, 0, 0]) and np.all(stats.var == 0) and np.all(stats.mean == 0)


@pytest.mark.parametrize(
    ("regime", "rescued"),
    [("ordinary", False), ("huge", True), ("tiny-eps0", True), ("far", True), ("nan", None), ("mean1e4", False)],
)
def test_rescue_triggers(regime, rescued):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    eps = 1e-5
    if regime == "huge":
        x[0, 3, 2, 1] = 1e25  # outside the corner
    elif regime == "tiny-eps0":
        x[0] *= 1e-30
        eps = 0.0
    elif regime == "far":
        x[0] += 1e3
        x[0, 0, :8, :] = 0.0  # the corner (the first 8 pixels) far from the rest: 31 std from the mean
    elif regime == "nan":
        x[0, 2, 2, 0] = np.nan
    elif regime == "mean1e4":
        x += 1e4  # a large mean is no reason: the corner is near it
    plan = make_plan(x.shape, "float32", groups=2, epsilon=eps)
    stats = np_backend.group_statistics(plan, x)
    if rescued is not None:  # (a NaN group's unit is of no consequence)
        assert bool(np.any(stats.unit != 1)) == rescued
    with np.errstate(invalid="ignore"):
        y = groupnorm.group_norm(x, 2, epsilon=eps)
        want = reference_group_norm(x, 2, epsilon=eps)
    good = np.isfinite(want)
    # float32 sums: within a few units in the last place of each output
    assert np.all(np.abs(y[good] - want[good]) <= 1e-5 * (1 + np.abs(want[good])))
    assert not np.isfinite(y[~good]).any()
    # sample 1 is ordinary: never rescued, whatever sample 0 holds
    assert np.all(per_group(stats.unit, plan)[1] == 1)


def test_nan_in_one_sample_leaves_huge_values_in_another_exact():
    """Issue case: x[0,0,0,0] = 1e30 and a NaN in sample 1 gave NaN throughout sample 0's first group."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 8)).astype(np.float32)
    x[0, 0, 0, 0] = 1e30
    x[1, 1, 2, 5] = np.nan
    y = groupnorm.group_norm(x, 4)
    with np.errstate(invalid="ignore"):
        want = reference_group_norm(x, 4)
    assert np.isfinite(y[0]).all()
    assert np.abs(y[0] - want[0]).max() <= 1e-5
    assert np.isnan(y[1, :, :, 4:6]).all() and np.isfinite(np.delete(y[1], [4, 5], axis=-1)).all()
    grads = vjp(x, np.ones_like(x), 4, gamma=np.ones(8, np.float32))
    assert np.isfinite(grads.inputs[0]).all()


def test_huge_values_outside_the_corner():
    """Issue case (TF's): the group's only non-zero values lie far from the corner."""
    x = np.zeros((1, 16, 16, 4), np.float32)
    x[0, 15, 15, 0] = 3e19
    x[0, 15, 14, 1] = -3e19
    y = groupnorm.group_norm(x, 1, reduction_axes=(1, 2))
    want = reference_group_norm(x, 1, -1, (1, 2))
    assert abs(want[0, 15, 15, 0] - 22.627) < 1e-3
    assert np.abs(y - want).max() <= 1e-5


def test_constant_huge_group_gives_beta_and_finite_gradients():
    x = np.full((2, 3, 3, 4), 3e38, np.float32)
    beta = np.arange(4, dtype=np.float32)
    gamma = np.full(4, 2.0, np.float32)
    np.testing.assert_array_equal(groupnorm.group_norm(x, 2, gamma=gamma, beta=beta), np.broadcast_to(beta, x.shape))
    dy = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    got = vjp(x, dy, 2, gamma=gamma, beta=beta, epsilon=1e-4)
    # a constant group: xhat = 0, dx = gamma * (dy - mean(dy)) / sqrt(eps)
    rows = dy.reshape(2, 9, 2, 2)
    want = (2.0 * (rows - rows.mean(axis=(1, 3), keepdims=True)) / math.sqrt(1e-4)).reshape(x.shape)
    np.testing.assert_allclose(got.inputs, want, rtol=1e-5, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(st.data(), hard_configs())
def test_hard_regimes_float32(data, cfg):
    case = data.draw(hard_inputs(cfg, np.float32))
    gamma, beta = parameters(cfg)
    y = groupnorm.group_norm(case.x, gamma=gamma, beta=beta, **cfg.kwargs())
    assert y.dtype == np.float32
    check_hard(y, case, cfg, gamma, beta)


@settings(max_examples=30, deadline=None)
@given(st.data(), hard_configs())
def test_hard_regimes_float16(data, cfg):
    case = data.draw(hard_inputs(cfg, np.float16))
    y = groupnorm.group_norm(case.x, **cfg.kwargs())
    assert y.dtype == np.float16
    check_hard(y, case, cfg)


@settings(max_examples=30, deadline=None)
@given(st.data(), hard_configs(max_rank=3, max_size=3))
def test_hard_regimes_gradients(data, cfg):
    """The vjp in float32 against the vjp of the float64 input (itself checked against finite
    differences in test_numpy.py), on groups that have an answer."""
    case = data.draw(hard_inputs(cfg, np.float32))
    gamma, beta = parameters(cfg)
    dy = np.random.default_rng(cfg.seed).standard_normal(case.x.shape).astype(np.float32)
    kwargs = {k: v for k, v in cfg.kwargs().items()}
    got = vjp(case.x, dy, gamma=gamma, beta=beta, **kwargs)
    exact = vjp(case.x.astype(np.float64), dy.astype(np.float64), gamma=gamma, beta=beta, **kwargs)
    good = ~case.poisoned & np.isfinite(exact.inputs)  # (a constant group with epsilon 0: no answer)
    # rounding in dx is relative to rstd * |gamma| * |dy|, its terms' size (the result may cancel to less)
    size = group_rstd(case.x, cfg) * np.abs(dy) * (1 if gamma is None else np.abs(gamma).max())
    scale = (np.abs(exact.inputs) + np.max(size[good], initial=0)) * conditioning(case.x, cfg)
    assert np.all(np.abs(got.inputs[good] - exact.inputs[good]) <= 3e-5 * scale[good])
