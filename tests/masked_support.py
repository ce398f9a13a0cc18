"""A float64 reference for group normalization with a mask, written independently of the package: each
group moved into one contiguous row, its statistics taken with NumPy over the unmasked elements only,
and its gradients from a derivation by hand."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from support import Config, reference_activation


def _rows(a: np.ndarray, cfg: Config) -> tuple[np.ndarray, list[int]]:
    """``a`` (input-shaped) as [kept..., groups, row]: each group one row; and the axis order used."""
    rank = a.ndim
    c = cfg.channels_axis % rank
    reduced = sorted(r % rank for r in cfg.reduction_axes)
    kept = [i for i in range(rank) if i != c and i not in reduced]
    order = [*kept, c, *reduced]
    row = (a.shape[c] // cfg.groups) * math.prod(a.shape[r] for r in reduced)
    return np.transpose(a, order).reshape([a.shape[i] for i in kept] + [cfg.groups, row]), order


def _per_channel(a: Any, cfg: Config) -> np.ndarray:
    shape = [1] * len(cfg.shape)
    shape[cfg.channels_axis] = cfg.channels
    return np.asarray(a, np.float64).reshape(shape)


def masked_reference(
    cfg: Config, x: np.ndarray, mask: np.ndarray, gamma: Any = None, beta: Any = None
) -> dict[str, np.ndarray]:
    """In float64: the normalized input (``xhat``, zero in groups with no unmasked element), the output
    before and after the activation, and a function for the gradients. Statistics see only the
    unmasked elements; every element is normalized with them."""
    x = np.asarray(x, np.float64)
    m = np.broadcast_to(np.asarray(mask, bool), x.shape)
    rows, order = _rows(x, cfg)
    mrows, _ = _rows(m, cfg)
    n = mrows.sum(axis=-1, keepdims=True)
    safe = np.maximum(n, 1)
    mean = np.where(mrows, rows, 0).sum(axis=-1, keepdims=True) / safe
    var = np.where(mrows, (rows - mean) ** 2, 0).sum(axis=-1, keepdims=True) / safe
    rstd = np.where(n > 0, 1 / np.sqrt(var + cfg.epsilon), 0)
    with np.errstate(invalid="ignore"):
        xhat_rows = np.where(n > 0, (rows - mean) * rstd, 0)
    moved_shape = [x.shape[i] for i in order]
    xhat = np.transpose(xhat_rows.reshape(moved_shape), np.argsort(order))
    pre = xhat * (1 if gamma is None else _per_channel(gamma, cfg)) + (0 if beta is None else _per_channel(beta, cfg))
    return {"xhat": xhat, "pre": pre, "y": reference_activation(cfg.activation, pre), "rstd": rstd, "n": n, "m": m}


def masked_reference_grads(
    cfg: Config, x: np.ndarray, mask: np.ndarray, cot: np.ndarray, gamma: Any = None, beta: Any = None
) -> dict[str, np.ndarray | None]:
    """dL/dx, dL/dgamma, dL/dbeta for L = sum(y * cot), derived by hand: with dxhat = dL/dxhat, a group's
    unmasked set S of n elements, dx_i = rstd * (dxhat_i - [i in S] / n * (sum dxhat + xhat_i * sum dxhat
    * xhat)), the sums over the whole group (the masked elements are normalized too)."""
    ref = masked_reference(cfg, x, mask, gamma, beta)
    dpre = np.asarray(cot, np.float64)
    if cfg.activation is not None:
        h = 1e-6
        pre = ref["pre"]
        dpre = (
            dpre
            * (reference_activation(cfg.activation, pre + h) - reference_activation(cfg.activation, pre - h))
            / (2 * h)
        )
    dxhat = dpre * (1 if gamma is None else _per_channel(gamma, cfg))
    xhat_rows, order = _rows(ref["xhat"], cfg)
    d_rows, _ = _rows(dxhat, cfg)
    m_rows, _ = _rows(ref["m"], cfg)
    n = np.maximum(ref["n"], 1)
    s1 = d_rows.sum(axis=-1, keepdims=True)
    s2 = (d_rows * xhat_rows).sum(axis=-1, keepdims=True)
    dx_rows = ref["rstd"] * (d_rows - m_rows / n * (s1 + xhat_rows * s2))
    dx = np.transpose(dx_rows.reshape([x.shape[i] for i in order]), np.argsort(order))
    others = tuple(i for i in range(x.ndim) if i != cfg.channels_axis % x.ndim)
    return {
        "x": dx,
        "gamma": None if gamma is None else (dpre * ref["xhat"]).sum(axis=others),
        "beta": None if beta is None else dpre.sum(axis=others),
    }
