"""Hypothesis strategies for the hard regimes of the numerics, drawn group by group: huge values anywhere
in a group (not only where a backend samples it), spreads too large or too small to square, constant
groups, a corner unlike the rest of its group, NaN and Inf next to huge values, and float16 near its
range. Every backend's property tests draw from here and check against the float64 reference."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st

from support import Config, configs, reference_group_norm

#: regimes a group may be drawn in; those marked poisoned hold NaN or Inf (the group has no answer)
FLOAT32_REGIMES = (
    "normal",
    "large_mean",
    "huge_anywhere",
    "huge_everywhere",
    "huge_opposite_signs",
    "tiny",
    "constant",
    "constant_huge",
    "far_corner",
    "nan_next_to_huge",
    "inf_next_to_huge",
)
FLOAT16_REGIMES = ("normal", "near_range", "peak_anywhere", "constant", "far_corner", "nan_next_to_huge")
POISONED = ("nan_next_to_huge", "inf_next_to_huge")
#: regimes whose mean is at most a few times their spread: the ones ``mean_close_to_zero=True`` is
#: accurate on (it is one-pass by design); its rescue makes the others exact where they overflow
CENTRED = ("normal", "huge_anywhere", "huge_everywhere", "huge_opposite_signs", "tiny", *POISONED, "near_range")


#: a few fixed configurations for the backends that compile once per plan (XLA) or per path: every
#: layout kind, with and without parameters and activations, ``mean_close_to_zero``, and epsilon 0
HARD_CONFIGS = (
    Config((2, 4, 5, 4), 2, -1, (1, 2)),
    Config((2, 4, 3, 3), 2, 1, (2, 3), activation="silu"),
    Config((3, 6), 3, -1, (), affine=False),
    Config((2, 3, 4, 2), 1, -1, (1,), mean_close_to_zero=True, activation="gelu"),
    Config((2, 4, 4, 4), 4, -1, (1, 2), epsilon=0.0),
)


@dataclass
class HardCase:
    x: np.ndarray
    """The input, in the dtype asked for."""
    poisoned: np.ndarray
    """True on every element of a group that holds NaN or Inf."""
    regimes: list[str]


def _rows(cfg: Config) -> tuple[list[int], list[int]]:
    """The axis order that makes every group one row (kept axes, channels, reduced axes), and the
    shape of that view as (kept..., groups, row)."""
    rank = len(cfg.shape)
    c = cfg.channels_axis % rank
    reduced = sorted(a % rank for a in cfg.reduction_axes)
    kept = [a for a in range(rank) if a != c and a not in reduced]
    order = [*kept, c, *reduced]
    row = (cfg.shape[c] // cfg.groups) * math.prod(cfg.shape[a] for a in reduced)
    return order, [*(cfg.shape[a] for a in kept), cfg.groups, row]


def _fill(regime: str, group: np.ndarray, draw: st.DrawFn, float16: bool) -> None:
    """Overwrite one group's elements, shaped (channels in the group, reduced positions), with ``regime``."""
    row = group.reshape(-1)
    n = row.size
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    some = rng.choice(n, size=max(1, min(n, draw(st.integers(1, 3)))), replace=False)
    normal = rng.standard_normal(n)
    if regime == "normal":
        row[:] = normal
    elif regime == "large_mean":
        row[:] = draw(st.sampled_from([1e3, 1e4, -3e4])) + normal
    elif regime == "huge_anywhere":
        row[:] = normal
        row[some] = draw(st.sampled_from([3e19, 1e25, 1e30, 3e37])) * rng.choice([-1, 1], some.size)
    elif regime == "huge_everywhere":
        row[:] = normal * draw(st.sampled_from([1e15, 3e19, 1e30, 1e37]))
    elif regime == "huge_opposite_signs":
        row[:] = 0.0
        row[some] = 1.5e38 * rng.choice([-1, 1], some.size)
        row[rng.integers(n)] = -row[some[0]]
    elif regime == "tiny":
        row[:] = normal * draw(st.sampled_from([1e-20, 1e-30, 1e-35]))
    elif regime == "constant":
        row[:] = draw(st.sampled_from([0.0, 7.25, -1e3, 1 + 2.0**-23]))
    elif regime == "constant_huge":
        row[:] = draw(st.sampled_from([3e19, -1e30, 3e38]))
    elif regime == "far_corner":
        # the first few positions (the corner, for every channel) are a border far from the content
        row[:] = (3e4 if float16 else 1e4) + (64 if float16 else 1) * normal
        group[:, :8] = 0.0
    elif regime == "nan_next_to_huge":
        row[:] = normal
        row[some] = 6e4 if float16 else 1e30
        row[rng.integers(n)] = np.nan
    elif regime == "inf_next_to_huge":
        row[:] = normal
        row[some] = 1e30
        row[rng.integers(n)] = -np.inf if draw(st.booleans()) else np.inf
    elif regime == "near_range":
        row[:] = rng.uniform(3e4, 6e4, n) * rng.choice([-1, 1])
    elif regime == "peak_anywhere":
        row[:] = normal
        row[some] = 6e4 * rng.choice([-1, 1], some.size)
    else:
        raise AssertionError(regime)


@st.composite
def hard_inputs(draw: st.DrawFn, cfg: Config, dtype: Any = np.float32) -> HardCase:
    """An input for ``cfg`` whose every group is drawn in one of the hard regimes (float16: its own
    regimes near its range); ``mean_close_to_zero`` configurations only draw centred regimes."""
    float16 = np.dtype(dtype) == np.float16
    regimes = FLOAT16_REGIMES if float16 else FLOAT32_REGIMES
    if cfg.mean_close_to_zero:
        regimes = tuple(r for r in regimes if r in CENTRED)
    if cfg.epsilon == 0:  # constant groups have no answer then
        regimes = tuple(r for r in regimes if not r.startswith("constant"))
    order, rows_shape = _rows(cfg)
    cg = cfg.channels // cfg.groups
    rows = np.zeros(rows_shape, np.float64)
    flat = rows.reshape(-1, rows_shape[-1])
    poisoned_rows = np.zeros(flat.shape, bool)
    chosen = []
    for i in range(flat.shape[0]):
        regime = draw(st.sampled_from(regimes))
        chosen.append(regime)
        _fill(regime, flat[i].reshape(cg, -1), draw, float16)
        poisoned_rows[i] = regime in POISONED
    moved_shape = [cfg.shape[a] for a in order]
    inverse = np.argsort(order)
    x = np.transpose(rows.reshape(moved_shape), inverse)
    poisoned = np.transpose(poisoned_rows.reshape(moved_shape), inverse)
    with np.errstate(over="ignore"):
        cast = np.ascontiguousarray(x).astype(dtype)
    return HardCase(cast, np.ascontiguousarray(poisoned), chosen)


@st.composite
def hard_configs(draw: st.DrawFn, max_rank: int = 4, max_size: int = 4) -> Config:
    """Configurations for the hard regimes: small, any layout, with or without parameters, and also
    an epsilon of 0 or below the range of float32 squares."""
    cfg = draw(configs(max_rank=max_rank, max_size=max_size))
    epsilon = draw(st.sampled_from([cfg.epsilon, cfg.epsilon, 0.0, 1e-30]))
    return dataclasses.replace(cfg, epsilon=epsilon)


def parameters(cfg: Config, dtype: Any = np.float32) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(gamma, beta)`` for ``cfg`` (``None`` unless affine): moderate values, reproducible."""
    if not cfg.affine:
        return None, None
    rng = np.random.default_rng(cfg.seed + 1)
    return (
        (1 + 0.5 * rng.standard_normal(cfg.channels)).astype(dtype),
        (0.5 * rng.standard_normal(cfg.channels)).astype(dtype),
    )


def conditioning(x: np.ndarray, cfg: Config) -> np.ndarray:
    """Per element, ``1 + (mean / std)**2`` of its group for ``mean_close_to_zero=True`` (the one-pass
    sums lose that many units in the last place, by design), 1 otherwise."""
    if not cfg.mean_close_to_zero:
        return np.ones(x.shape)
    order, rows_shape = _rows(cfg)
    rows = np.transpose(x.astype(np.float64), order).reshape(rows_shape)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        ratio = 1 + rows.mean(axis=-1, keepdims=True) ** 2 / (rows.var(axis=-1, keepdims=True) + cfg.epsilon)
    ratio = np.broadcast_to(np.nan_to_num(ratio, nan=1.0, posinf=1e300), rows.shape)
    return np.transpose(ratio.reshape([cfg.shape[a] for a in order]), np.argsort(order))


def group_rstd(x: np.ndarray, cfg: Config) -> np.ndarray:
    """Per element, ``1 / sqrt(var + epsilon)`` of its group in float64 (the scale of the input's
    gradient: its rounding errors are that times the cotangent's)."""
    order, rows_shape = _rows(cfg)
    rows = np.transpose(x.astype(np.float64), order).reshape(rows_shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        rstd = np.broadcast_to(1 / np.sqrt(rows.var(axis=-1, keepdims=True) + cfg.epsilon), rows.shape)
    return np.transpose(rstd.reshape([cfg.shape[a] for a in order]), np.argsort(order))


def check_hard(y: Any, case: HardCase, cfg: Config, gamma: Any = None, beta: Any = None) -> None:
    """``y`` against the float64 reference: within float32 (float16: float16) rounding of it on every
    group that has an answer; NaN throughout every group that holds NaN or Inf (where no activation
    could turn NaN into a number)."""
    y = np.asarray(y, np.float64)
    assert y.shape == case.x.shape
    with np.errstate(invalid="ignore", over="ignore"):
        want = reference_group_norm(
            case.x.astype(np.float64),
            cfg.groups,
            cfg.channels_axis,
            cfg.reduction_axes,
            gamma,
            beta,
            cfg.epsilon,
            cfg.activation,
        )
        normalized = reference_group_norm(
            case.x.astype(np.float64), cfg.groups, cfg.channels_axis, cfg.reduction_axes, epsilon=cfg.epsilon
        )
    # no answer: a group holding NaN or Inf, or a constant group with epsilon 0 (0 / 0)
    poisoned = case.poisoned | np.isnan(normalized)
    good = ~poisoned
    tol = 4e-3 if case.x.dtype == np.float16 else 3e-5
    error = np.abs(y[good] - want[good])
    bound = tol * (1 + np.abs(want[good])) * conditioning(case.x, cfg)[good]
    assert np.all(error <= bound), (
        f"max error {np.max(error - bound, initial=0):.3g} over the bound; regimes {sorted(set(case.regimes))}"
    )
    if cfg.activation is None:
        assert not np.isfinite(y[poisoned]).any(), "a group without an answer gave finite values"
