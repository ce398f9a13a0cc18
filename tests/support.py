"""Shared test support: an independent float64 reference, data that is hard for the algorithm, and
hypothesis strategies for random group normalization configurations.

The reference deliberately shares no code with the package: it moves the kept axes to the front, the
channel axis after them and the reduction axes last, so that each group is one contiguous row, and
takes a two-pass mean and variance of that row in float64.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

ACTIVATION_NAMES = ("relu", "silu", "gelu")

_erf = np.vectorize(math.erf, otypes=[np.float64])


def reference_activation(name: str | None, y: np.ndarray) -> np.ndarray:
    if name is None:
        return y
    if name == "relu":
        return np.where(y > 0, y, 0.0)
    if name == "silu":
        return y / (1.0 + np.exp(-y))
    if name == "gelu":
        return 0.5 * y * (1.0 + _erf(y / math.sqrt(2.0)))
    raise AssertionError(name)


def reference_group_norm(
    x: Any,
    groups: int,
    channels_axis: int = -1,
    reduction_axes: tuple[int, ...] = (-3, -2),
    gamma: Any = None,
    beta: Any = None,
    epsilon: float = 1e-6,
    activation: str | None = None,
) -> np.ndarray:
    """Group normalization in float64, written independently of the package."""
    x = np.asarray(x, dtype=np.float64)
    rank = x.ndim
    c = channels_axis % rank
    reduced = sorted(a % rank for a in reduction_axes)
    kept = [a for a in range(rank) if a != c and a not in reduced]
    order = [*kept, c, *reduced]
    moved = np.transpose(x, order)
    row = (x.shape[c] // groups) * math.prod(x.shape[a] for a in reduced)
    rows = moved.reshape([x.shape[a] for a in kept] + [groups, row])
    mean = rows.mean(axis=-1, keepdims=True)
    var = ((rows - mean) ** 2).mean(axis=-1, keepdims=True)
    normalized = ((rows - mean) / np.sqrt(var + epsilon)).reshape(moved.shape)
    y = np.transpose(normalized, np.argsort(order))
    per_channel = [1] * rank
    per_channel[c] = x.shape[c]
    if gamma is not None:
        y = y * np.asarray(gamma, np.float64).reshape(per_channel)
    if beta is not None:
        y = y + np.asarray(beta, np.float64).reshape(per_channel)
    return reference_activation(activation, y)


def hard_data(
    shape: tuple[int, ...],
    channels_axis: int,
    mean_over_std: float,
    *,
    std: float = 1.0,
    dtype: Any = np.float32,
    seed: int = 0,
) -> np.ndarray:
    """Normal data whose every channel has mean ``mean_over_std * std`` (+/- a few percent, so that the
    groups differ) and standard deviation ``std``: the harder the larger ``mean_over_std``."""
    rng = np.random.default_rng(seed)
    per_channel = [1] * len(shape)
    per_channel[channels_axis] = shape[channels_axis]
    means = mean_over_std * std * (1 + 0.05 * rng.standard_normal(per_channel))
    return (means + std * rng.standard_normal(shape)).astype(dtype)


@dataclass(frozen=True)
class Config:
    """One group normalization configuration, as ``groupnorm.group_norm`` takes it."""

    shape: tuple[int, ...]
    groups: int
    channels_axis: int
    reduction_axes: tuple[int, ...]
    affine: bool = True
    activation: str | None = None
    mean_close_to_zero: bool = False
    epsilon: float = 1e-5
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def channels(self) -> int:
        return self.shape[self.channels_axis]

    def kwargs(self) -> dict[str, Any]:
        return {
            "groups": self.groups,
            "channels_axis": self.channels_axis,
            "reduction_axes": self.reduction_axes,
            "epsilon": self.epsilon,
            "mean_close_to_zero": self.mean_close_to_zero,
            "activation_fn": self.activation,
        }

    def arrays(self, dtype: Any = np.float64, mean_over_std: float = 0.5) -> dict[str, np.ndarray | None]:
        """Input, gamma, beta (None unless affine) and an output cotangent, reproducible from ``seed``."""
        rng = np.random.default_rng(self.seed)
        x = hard_data(self.shape, self.channels_axis, mean_over_std, dtype=dtype, seed=self.seed)
        gamma = beta = None
        if self.affine:
            gamma = (1 + 0.5 * rng.standard_normal(self.channels)).astype(dtype)
            beta = (0.5 * rng.standard_normal(self.channels)).astype(dtype)
        cotangent = rng.standard_normal(self.shape).astype(dtype)
        return {"x": x, "gamma": gamma, "beta": beta, "cotangent": cotangent}

    def reference(self, x: Any, gamma: Any = None, beta: Any = None) -> np.ndarray:
        return reference_group_norm(
            x, self.groups, self.channels_axis, self.reduction_axes, gamma, beta, self.epsilon, self.activation
        )


@st.composite
def configs(draw: st.DrawFn, *, max_rank: int = 5, max_size: int = 4, activations: bool = True) -> Config:
    """Random configurations: rank 1..max_rank, any channel axis, any subset of reduction axes (given
    with random signs and order), a random divisor of the channel count as groups."""
    rank = draw(st.integers(1, max_rank))
    channels = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    c = draw(st.integers(0, rank - 1))
    shape = [draw(st.integers(1, max_size)) for _ in range(rank)]
    shape[c] = channels
    others = [a for a in range(rank) if a != c]
    reduced = draw(st.lists(st.sampled_from(others), unique=True, max_size=len(others))) if others else []
    signed = tuple(a - rank if draw(st.booleans()) else a for a in reduced)
    groups = draw(st.sampled_from([g for g in range(1, channels + 1) if channels % g == 0]))
    return Config(
        shape=tuple(shape),
        groups=groups,
        channels_axis=c - rank if draw(st.booleans()) else c,
        reduction_axes=signed,
        affine=draw(st.booleans()),
        activation=draw(st.sampled_from((None, *ACTIVATION_NAMES))) if activations else None,
        mean_close_to_zero=draw(st.booleans()),
        epsilon=draw(st.sampled_from([1e-6, 1e-5, 1e-3])),
        seed=draw(st.integers(0, 2**16)),
    )


#: configurations every backend checks by name: the common layouts and the seed's examples.
NAMED_CONFIGS = {
    "nhwc": Config((2, 4, 5, 8), 4, -1, (-3, -2)),
    "nchw": Config((2, 8, 4, 5), 4, -3, (-2, -1)),
    "hwc-no-batch": Config((4, 5, 8), 2, -1, (-3, -2)),
    "2d-layernorm-like": Config((3, 12), 3, -1, ()),
    "3d-sequence": Config((2, 7, 6), 3, -1, (-2,)),
    "5d-video-per-frame": Config((2, 3, 4, 4, 6), 3, -1, (-3, -2)),
    "5d-ncdhw": Config((2, 6, 3, 4, 4), 2, 1, (2, 3, 4)),
    "instance-norm": Config((2, 3, 3, 4), 4, -1, (1, 2)),
    "relu-fast": Config((2, 4, 4, 8), 2, -1, (-3, -2), activation="relu", mean_close_to_zero=True),
    "silu": Config((2, 4, 4, 8), 4, 1, (2, 3), activation="silu"),
    "gelu": Config((2, 8, 3, 3), 8, 1, (2, 3), activation="gelu", affine=False),
}


def run_python(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python *args`` in a fresh process (with ``env`` added to the environment) that imports this
    checkout's ``groupnorm`` and the tests' helpers."""
    here = Path(__file__).resolve().parent
    full = dict(os.environ, **env)
    full["PYTHONPATH"] = os.pathsep.join([str(here.parent / "src"), str(here), os.environ.get("PYTHONPATH", "")])
    full.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return subprocess.run([sys.executable, *args], env=full, capture_output=True, text=True, timeout=300, check=False)
