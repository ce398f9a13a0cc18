"""Runs groupnorm's Triton kernels on the cases of triton_cases.py and measures them against float64.

``python triton_check.py`` runs every case on the CPU through Triton's interpreter (it sets
``TRITON_INTERPRET=1`` and ``GROUPNORM_TRITON_INTERPRET=1`` before Triton is imported, which is why it
runs in a process of its own) and prints one JSON object per case; test_torch_triton.py starts it and
checks the results. On a machine with a GPU the same :func:`run_case` runs on CUDA tensors in-process.

References, written independently of the package: the output is support.reference_group_norm (NumPy,
float64); the statistics are computed here from their definitions; gradients are float64 torch autograd
of a composite written here.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import numpy as np

from support import hard_data, reference_group_norm
from triton_cases import (
    CASES,
    GRADIENT_TOLERANCE,
    MEAN_OVER_STD,
    OUTPUT_TOLERANCE,
    STATISTICS_TOLERANCE,
    Case,
)

#: module settings of the split path for the cases: tiles of 16 elements, and groups in several chunks of
#: several tiles (few partials per group force longer chunks), the last one often ragged
SPLIT_SETTINGS = {"FUSED_ELEMENTS": 0, "TILE_ELEMENTS": 16, "TARGET_PROGRAMS": 32, "MAX_GROUP_PARTIALS": 8}


def make_input(case: Case, values: Any, memory: str | None = None) -> Any:
    """``values`` (a float64 torch tensor) in the case's dtype and memory layout."""
    import torch

    t = values.to(getattr(torch, case.dtype))
    memory = case.memory if memory is None else memory
    if memory == "contiguous":
        return t.contiguous()
    if memory == "channels_last":
        return t.contiguous(memory_format={4: torch.channels_last, 5: torch.channels_last_3d}[t.dim()])
    if memory == "hcw":  # (N, C, H, W) stored as (N, H, C, W)
        return t.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    if memory == "strided":  # every other element of a tensor twice as wide
        wide = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    raise AssertionError(memory)


def composite64(x: Any, case: Case, gamma: Any, beta: Any, epsilon: float) -> Any:
    """Group normalization in float64 torch operations (for autograd): each group a contiguous row."""
    import torch
    import torch.nn.functional as F

    rank = x.dim()
    c = case.channels_axis % rank
    reduced = sorted(a % rank for a in case.reduction_axes)
    kept = [a for a in range(rank) if a != c and a not in reduced]
    order = [*kept, c, *reduced]
    moved = x.permute(order)
    rows = moved.reshape(*[x.shape[a] for a in kept], case.groups, -1)
    mean = rows.mean(dim=-1, keepdim=True)
    var = ((rows - mean) ** 2).mean(dim=-1, keepdim=True)
    y = ((rows - mean) / torch.sqrt(var + epsilon)).reshape(moved.shape).permute(*np.argsort(order).tolist())
    per_channel = [1] * rank
    per_channel[c] = x.shape[c]
    if gamma is not None:
        y = y * gamma.reshape(per_channel)
    if beta is not None:
        y = y + beta.reshape(per_channel)
    activations = {None: lambda t: t, "relu": torch.relu, "silu": F.silu, "gelu": F.gelu}
    return activations[case.activation](y)


def reference_statistics(x: np.ndarray, case: Case, shift: np.ndarray, epsilon: float) -> dict[str, np.ndarray]:
    """Per (kept row, group), from the definitions: the shift (the group's mean over its first
    min(8, R) reduced positions, flattened row-major), and the mean and rstd of ``x - shift``, where
    ``shift`` is the kernel's own float32 value."""
    rank = x.ndim
    c = case.channels_axis % rank
    reduced = sorted(a % rank for a in case.reduction_axes)
    kept = [a for a in range(rank) if a != c and a not in reduced]
    k = math.prod(x.shape[a] for a in kept)
    r = math.prod(x.shape[a] for a in reduced)
    groups = np.transpose(x, [*kept, c, *reduced]).reshape(k, case.groups, -1, r)
    corner = 0.0 * groups[..., 0, 0] if case.mean_close_to_zero else groups[..., : min(8, r)].mean(axis=(2, 3))
    z = groups - shift.astype(np.float64)[:, :, None, None]
    mean = z.mean(axis=(2, 3))
    var = ((z - mean[:, :, None, None]) ** 2).mean(axis=(2, 3))
    return {"shift": corner, "mean": mean, "rstd": 1 / np.sqrt(var + epsilon), "std": np.sqrt(var)}


def _ratio(got: Any, want: np.ndarray, atol: float, rtol: float = 0.0) -> float:
    """The largest ``|got - want| / (atol + rtol |want|)`` (at most 1 passes)."""
    g = got.double().numpy() if hasattr(got, "double") else np.asarray(got, np.float64)
    if g.shape != want.shape:
        return math.inf
    if want.size == 0:
        return 0.0
    return float(np.max(np.abs(g - want) / (atol + rtol * np.abs(want))))


def _scaled(got: Any, want: np.ndarray, tolerance: np.ndarray) -> float:
    """The largest ``|got - want| / tolerance``, elementwise (at most 1 passes)."""
    return float(np.max(np.abs(got.cpu().double().numpy() - want) / tolerance))


def _expected_strides(x: Any) -> tuple[int, ...]:
    """An output's strides: the input's where it is dense (a permutation of a contiguous tensor), else contiguous."""
    import torch

    dims = sorted((x.stride(a), x.shape[a]) for a in range(x.dim()) if x.shape[a] != 1)
    expected, dense = 1, True
    for stride, size in dims:
        dense &= stride == expected
        expected *= size
    return tuple(x.stride()) if dense else tuple(torch.empty(x.shape).stride())


def run_case(case: Case, device: str = "cpu", settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Forward and backward of one case; the errors as ratios to their tolerance, and checks of shapes,
    dtypes and strides."""
    import torch

    from groupnorm._plan import make_plan
    from groupnorm.backends.torch import _triton

    if settings is None:
        settings = SPLIT_SETTINGS if case.path == "split" else {}
    saved = {name: getattr(_triton, name) for name in settings}
    for name, value in settings.items():
        setattr(_triton, name, value)
    try:
        return _run(case, device, torch, make_plan, _triton)
    finally:
        for name, value in saved.items():
            setattr(_triton, name, value)


def _run(case: Case, device: str, torch: Any, make_plan: Any, _triton: Any) -> dict[str, Any]:
    seed = sum(map(ord, case.name)) % 2**16
    rng = np.random.default_rng(seed)
    epsilon = 1e-5
    dtype = getattr(torch, case.dtype)
    # mean_close_to_zero promises a small mean: there the data's mean is half its spread
    mean_over_std = 0.5 if case.mean_close_to_zero else MEAN_OVER_STD
    values = torch.from_numpy(hard_data(case.shape, case.channels_axis, mean_over_std, dtype=np.float64, seed=seed))
    x = make_input(case, values).to(device)
    channels = case.shape[case.channels_axis]
    param_dtype = torch.float32 if case.dtype == "float32" else dtype
    gamma = beta = None
    if case.affine:
        gamma = torch.from_numpy(1 + 0.5 * rng.standard_normal(channels)).to(param_dtype).to(device)
        beta = torch.from_numpy(0.5 * rng.standard_normal(channels)).to(param_dtype).to(device)
    if case.expanded_cotangent:
        dy = torch.full((1,) * len(case.shape), 0.75, dtype=dtype, device=device).expand(case.shape)
    else:
        cot = torch.from_numpy(rng.standard_normal(case.shape))
        dy = make_input(case, cot, case.memory if case.path == "fused" else "contiguous").to(device)
    plan = make_plan(
        case.shape, case.dtype, groups=case.groups, channels_axis=case.channels_axis,
        reduction_axes=case.reduction_axes, epsilon=epsilon, mean_close_to_zero=case.mean_close_to_zero,
    )  # fmt: skip
    out: dict[str, Any] = {"name": case.name}
    out["available"] = _triton.available(x)
    out["supports"] = _triton.supports(plan, x)
    view = _triton._view(plan, x.shape, [x.stride(), _triton._out_strides(x)])
    if _triton._fused_tile(view) is None:
        sp = _triton._split(view, x)
        out["split"] = {"chunks": sp.chunks, "iterations": sp.iterations, "ragged": view.reduced % sp.chunk_rows != 0}
    x_before = x.clone()

    y, shift, mean, rstd = _triton.forward(plan, x, gamma, beta, case.activation)
    x64 = x.cpu().double().numpy()
    np_param = {
        "gamma": None if gamma is None else gamma.cpu().double().numpy(),
        "beta": None if beta is None else beta.cpu().double().numpy(),
    }
    want = reference_group_norm(
        x64, case.groups, case.channels_axis, case.reduction_axes, np_param["gamma"], np_param["beta"], epsilon,
        case.activation,
    )  # fmt: skip
    atol, rtol = OUTPUT_TOLERANCE[case.dtype]
    out["y"] = _ratio(y.cpu(), want, atol, rtol)
    out["y_layout"] = [y.dtype == dtype, tuple(y.shape) == case.shape, y.stride() == _expected_strides(x)]
    stats = reference_statistics(x64, case, shift.cpu().numpy(), epsilon)
    kept_rows = stats["mean"].shape[0]
    out["stats_layout"] = [
        all(t.dtype == torch.float32 and tuple(t.shape) == (kept_rows, case.groups) for t in (shift, mean, rstd))
    ]
    # the shift: exactly 0 with mean_close_to_zero, else a float32 mean of a few values
    shift_scale = np.abs(stats["shift"]) + stats["std"] + 1e-30
    exact = bool(torch.all(shift == 0)) if case.mean_close_to_zero else True
    out["shift"] = _scaled(shift, stats["shift"], STATISTICS_TOLERANCE * shift_scale) if exact else math.inf
    # the mean is a float32: within the tolerance of its own size or of the group's spread, whichever is larger
    mean_scale = np.abs(stats["mean"]) + stats["std"] + 1e-30
    out["mean"] = _scaled(mean, stats["mean"], STATISTICS_TOLERANCE * mean_scale)
    out["rstd"] = _ratio(rstd.cpu(), stats["rstd"], 0.0, STATISTICS_TOLERANCE)

    dx, dgamma, dbeta = _triton.backward(plan, x, gamma, beta, case.activation, shift, mean, rstd, dy, case.needs)
    out["unchanged"] = bool(torch.equal(x, x_before))
    leaves = [torch.from_numpy(x64).requires_grad_()]
    g64 = b64 = None
    if gamma is not None and beta is not None:
        g64 = gamma.cpu().double().requires_grad_()
        b64 = beta.cpu().double().requires_grad_()
        leaves += [g64, b64]
    y64 = composite64(leaves[0], case, g64, b64, epsilon)
    grads = torch.autograd.grad(y64, leaves, dy.cpu().double())
    tol = GRADIENT_TOLERANCE[case.dtype]
    gamma_size = 1.0 if gamma is None else float(gamma.abs().max())
    got = {"dx": dx, "dgamma": dgamma, "dbeta": dbeta}
    wanted = {"dx": case.needs[0], "dgamma": case.needs[1] and case.affine, "dbeta": case.needs[2] and case.affine}
    refs = dict(zip(("dx", "dgamma", "dbeta"), grads, strict=False))
    out["grad_presence"] = [(got[k] is not None) == wanted[k] for k in got]
    for key, g in got.items():
        if g is None or not wanted[key]:
            continue
        ref = refs[key].numpy()
        # dx is a difference of terms up to about rstd * |gamma| * |dy| (which can nearly cancel)
        size = float(np.max(np.abs(ref)))
        if key == "dx":
            size = max(size, float(np.max(stats["rstd"])) * gamma_size * float(dy.abs().max()))
        out[key] = _ratio(g.cpu(), ref, tol * size + 1e-30)
        like = x if key == "dx" else gamma
        strides_ok = g.stride() == _expected_strides(x) if key == "dx" else True
        out[f"{key}_layout"] = [g.dtype == like.dtype, tuple(g.shape) == tuple(like.shape), strides_ok]
    return out


def main() -> None:
    names = sys.argv[1:] or list(CASES)
    for name in names:
        print(json.dumps(run_case(CASES[name])), flush=True)


if __name__ == "__main__":
    if "triton" in sys.modules:
        raise SystemExit("triton was imported before the interpreter was asked for")
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["GROUPNORM_TRITON_INTERPRET"] = "1"
    np.seterr(over="ignore")  # the interpreter's exp overflows, as the GPU's does, to inf
    main()
