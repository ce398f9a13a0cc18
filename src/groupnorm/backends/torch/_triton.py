"""Triton kernels for group normalization on CUDA tensors: forward and backward, with a fused activation.

Triton is optional: without it this module still imports, and :func:`available` says no. With
``GROUPNORM_TRITON_INTERPRET=1`` together with Triton's own ``TRITON_INTERPRET=1`` (both set before Triton
is imported), CPU tensors run through the same kernels in Triton's interpreter, which is how the kernels
are tested on machines without a GPU.

How a tensor is seen
--------------------
Every tensor is addressed through its strides as a five-axis view ``(K1, K2, C, RA, RB)``: the kept axes
(in their order) merged into at most two runs ``K1, K2``, the channel axis, and the reduction axes merged
into at most two runs ``RA, RB``. Axes merge where every tensor of the call allows it, so the view covers
contiguous NCHW and ``(N, C, *)``, channels-last memory, NHWC with ``channels_axis=-1`` and 5-D input with
per-clip or per-frame statistics, whatever each tensor's memory order; kept row ``k = k1 * K2 + k2`` and
reduced position ``r = ra * RB + rb`` are row-major over the logical axes. Kernels work on tiles of
``(reduced positions) x (channels)``; Triton coalesces along whichever of the two is unit-stride.

Numerics
--------
Each group ``(k, g)`` is shifted by ``K``, the mean of the group's channels over the first ``min(8, R)``
reduced positions (``K = 0`` with ``mean_close_to_zero``), so that ``x - K`` is exact for values near the
mean. Statistics are float32 for every input dtype and never a plain sum of squares: a group whose tile
fits one program (:data:`FUSED_ELEMENTS`) takes a two-pass mean and variance of ``x - K`` in registers;
larger groups are split over many programs (:data:`PROGRAMS_PER_SM`), each reducing a chunk of rows per
channel to a local shift (its first value), the mean of the values less that shift and their ``M2`` (the
sum of squared deviations), tile by tile with Chan's update; a small second kernel combines the chunks
exactly in the same way. The output is ``(x - K) * scale + offset`` with ``scale = rstd * gamma`` and
``offset = beta - mean * scale``, followed by the activation, in one read and one write.

The backward pass recomputes ``xhat`` and the pre-activation value from ``x`` and the statistics, sums
``dy'`` (the gradient before the activation) and ``dy' * xhat`` per channel (split like the forward
pass), and writes ``dx = rstd * (gamma dy' - mean_g(gamma dy') - xhat mean_g(gamma dy' xhat))`` in one
elementwise pass. Nothing synchronises with the host: every decision depends on shapes and strides only,
so the passes can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from groupnorm._plan import Plan

__all__ = ["available", "backward", "forward", "supports"]

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # an optional dependency
    HAVE_TRITON = False

#: a group whose padded (reduced positions x channels) tile holds at most this many elements is done by one
#: program, in registers, with a single kernel per pass; larger groups take the split passes.
FUSED_ELEMENTS = 4096

#: elements per tile of the split passes.
TILE_ELEMENTS = 4096

#: the smallest tile the split passes shrink to when the input gives too few programs.
MIN_TILE_ELEMENTS = 1024

#: at most this many partial statistics per group (chunks x channels per group) for the combining pass.
MAX_GROUP_PARTIALS = 4096

#: how many programs the split passes aim for on the GPU, per streaming multiprocessor.
PROGRAMS_PER_SM = 8

#: how many programs the split passes aim for where the device does not say (Triton's interpreter), or
#: when set (tests force many chunks with it).
TARGET_PROGRAMS: int | None = None

#: positions of each group's reduced axes (flattened row-major) whose mean is the shift.
SHIFT_SAMPLE = 8

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACTIVATIONS = {None: 0, "relu": 1, "silu": 2, "gelu": 3}
_INT32_LIMIT = 2**31 - 1


def _interpreting() -> bool:
    """Interpreter mode: both switches on, and Triton did read its own before the kernels were defined."""
    if os.environ.get("GROUPNORM_TRITON_INTERPRET") != "1" or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return type(_forward_fused).__name__ == "InterpretedFunction"


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on ``x``'s device: Triton is importable and ``x`` is a CUDA tensor, or
    a CPU tensor in interpreter mode. Never raises."""
    try:
        if not HAVE_TRITON or not isinstance(x, torch.Tensor):
            return False
        return bool(x.is_cuda) or (x.device.type == "cpu" and _interpreting())
    except Exception:
        return False


# --------------------------------------------------------------------------------------------------
# the view


@dataclass(frozen=True)
class _View:
    """A call's tensors as ``(K1, K2, C, RA, RB)``: sizes, and per tensor its five strides."""

    kept: int
    kept_inner: int
    """``K2``: kept row ``k`` is ``(k // K2, k % K2)``."""
    reduced: int
    reduced_inner: int
    """``RB``: reduced position ``r`` is ``(r // RB, r % RB)``; 1 where the reduced axes merge into one run."""
    channels: int
    groups: int
    strides: tuple[tuple[int, int, int, int, int], ...]
    wide: bool
    """Whether some offset needs 64-bit arithmetic."""

    @property
    def group_channels(self) -> int:
        return self.channels // self.groups

    @property
    def group_size(self) -> int:
        return self.reduced * self.group_channels


def _runs(axes: Sequence[int], shape: Sequence[int], strides: Sequence[Sequence[int]]) -> list[tuple[int, list[int]]]:
    """``axes`` (in order, size-1 axes left out) merged where every tensor's strides allow: (size, strides)."""
    runs: list[tuple[int, list[int]]] = []
    for a in axes:
        n = shape[a]
        if n == 1:
            continue
        here = [s[a] for s in strides]
        if runs and all(prev == cur * n for prev, cur in zip(runs[-1][1], here, strict=True)):
            runs[-1] = (runs[-1][0] * n, here)
        else:
            runs.append((n, here))
    return runs


def _two(runs: list[tuple[int, list[int]]], count: int) -> tuple[int, int, list[int], list[int]] | None:
    """At most two runs as (outer size, inner size, outer strides, inner strides); a single run is outer."""
    zeros = [0] * count
    if len(runs) > 2:
        return None
    if not runs:
        return 1, 1, zeros, zeros
    if len(runs) == 1:
        return runs[0][0], 1, runs[0][1], zeros
    return runs[0][0] * runs[1][0], runs[1][0], runs[0][1], runs[1][1]


def _view(plan: Plan, shape: Sequence[int], strides: Sequence[Sequence[int]]) -> _View | None:
    """The view of tensors of ``shape`` with the given strides (the input's first), or None where the kept or
    the reduction axes do not merge into two runs."""
    kept = _two(_runs(plan.kept_axes, shape, strides), len(strides))
    reduced = _two(_runs(plan.reduction_axes, shape, strides), len(strides))
    if kept is None or reduced is None:
        return None
    k, k2, sk1, sk2 = kept
    r, rb, sra, srb = reduced
    c = plan.channels_axis
    per_tensor = tuple((sk1[i], sk2[i], s[c], sra[i], srb[i]) for i, s in enumerate(strides))
    reach = max(sum((n - 1) * abs(st) for n, st in zip(shape, s, strict=True)) for s in strides)
    wide = max(reach, math.prod(shape)) > _INT32_LIMIT
    return _View(k, k2, r, rb, int(shape[c]), plan.groups, per_tensor, wide)


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(int(n), 1)
    return tuple(reversed(strides))


def _dense(x: torch.Tensor) -> bool:
    """Whether ``x``'s elements fill its memory exactly once (a permutation of a contiguous tensor)."""
    expected = 1
    for stride, size in sorted((x.stride(a), x.shape[a]) for a in range(x.dim()) if x.shape[a] != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _out_strides(x: torch.Tensor) -> tuple[int, ...]:
    """Strides of an output like ``x``: ``x``'s own where it is dense, else contiguous."""
    return tuple(x.stride()) if _dense(x) else _contiguous_strides(x.shape)


def _new_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(x.shape, _out_strides(x), dtype=x.dtype, device=x.device)


def supports(plan: Plan, x: torch.Tensor) -> bool:
    """Whether the kernels handle ``x`` under ``plan``: a float32, float16 or bfloat16 input, not empty, of
    the plan's rank, whose kept and reduction axes each merge into at most two strided runs (in ``x`` and in
    the output). Never raises."""
    try:
        if x.dtype not in _DTYPES or x.numel() == 0 or x.dim() != plan.rank:
            return False
        return _view(plan, x.shape, [x.stride(), _out_strides(x)]) is not None
    except Exception:
        return False


# --------------------------------------------------------------------------------------------------
# launch geometry


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _warps(elements: int) -> int:
    return 8 if elements >= 2048 else 4 if elements >= 512 else 2


@functools.lru_cache(maxsize=16)
def _device_programs(index: int) -> int:
    return PROGRAMS_PER_SM * int(torch.cuda.get_device_properties(index).multi_processor_count)


def _target_programs(x: torch.Tensor) -> int:
    if TARGET_PROGRAMS is not None:
        return TARGET_PROGRAMS
    if x.is_cuda:
        return _device_programs(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return 64


@dataclass(frozen=True)
class _Split:
    """Tiles and chunks of the split passes."""

    block_r: int
    block_c: int
    chunk_rows: int
    chunks: int

    @property
    def iterations(self) -> int:
        return self.chunk_rows // self.block_r


def _tile(v: _View, channel_stride: int) -> tuple[int, int]:
    """A (rows, channels) tile of :data:`TILE_ELEMENTS`, wide along whichever axis is unit-stride in ``x``."""
    budget = max(1, TILE_ELEMENTS)
    if abs(channel_stride) == 1:
        bc = min(_pow2(v.channels), 128, budget)
        return min(_pow2(v.reduced), max(1, budget // bc)), bc
    br = min(_pow2(v.reduced), budget)
    return br, min(_pow2(v.channels), max(1, budget // br))


def _split(v: _View, x: torch.Tensor) -> _Split:
    """Tiles, and chunks of whole tiles. Where one tile per program would give too few programs, tiles
    shrink first (down to :data:`MIN_TILE_ELEMENTS`); then each group's rows are cut into enough chunks for
    the target, but into no more than :data:`MAX_GROUP_PARTIALS` partial statistics per group."""
    target = _target_programs(x)
    br, bc = _tile(v, v.strides[0][2])
    channel_tiles = -(-v.channels // bc)
    floor = min(MIN_TILE_ELEMENTS, TILE_ELEMENTS)
    while br > 1 and br * bc // 2 >= floor and v.kept * channel_tiles * -(-v.reduced // br) < target:
        br //= 2
    row_tiles = -(-v.reduced // br)
    wanted = -(-target // (v.kept * channel_tiles))
    iterations = max(1, row_tiles // max(1, wanted))  # so that there are at least `wanted` chunks,
    most = max(1, MAX_GROUP_PARTIALS // v.group_channels)  # but not too many for the combining pass
    iterations = max(iterations, -(-row_tiles // most))
    chunk_rows = iterations * br
    return _Split(br, bc, chunk_rows, -(-v.reduced // chunk_rows))


def _fused_tile(v: _View) -> tuple[int, int] | None:
    br, bc = _pow2(v.reduced), _pow2(v.group_channels)
    return (br, bc) if br * bc <= FUSED_ELEMENTS else None


def _combine_tile(v: _View, chunks: int) -> tuple[int, int]:
    bc = min(_pow2(v.group_channels), 256)
    return min(_pow2(chunks), max(1, 2048 // bc)), bc


def _guard(x: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """Launch on ``x``'s device (Triton launches on the current one)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _param(p: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A parameter and its stride; an absent one is a placeholder pointer that is never read."""
    return (x, 0) if p is None else (p.detach(), int(p.stride(0)))


def _activation_code(activation: str | None) -> int:
    try:
        return _ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(f"unknown activation {activation!r} for the Triton kernels") from None


def _require(v: _View | None) -> _View:
    if not HAVE_TRITON:
        raise RuntimeError("groupnorm's GPU kernels need Triton: pip install 'groupnorm[triton]'")
    if v is None:
        raise ValueError("groupnorm: the Triton kernels do not handle this layout (see supports())")
    return v


# --------------------------------------------------------------------------------------------------
# forward and backward


def forward(
    plan: Plan, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, activation: str | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward pass: ``(y, shift, mean, rstd)``, the statistics float32 of shape ``(K, G)``."""
    act = _activation_code(activation)
    y = _new_like(x)
    v = _require(_view(plan, x.shape, [x.stride(), y.stride()]))
    k, g, cg = v.kept, v.groups, v.group_channels
    stats = torch.empty((3, k, g), dtype=torch.float32, device=x.device)
    shift, mean, rstd = stats[0], stats[1], stats[2]
    w, sw = _param(weight, x)
    b, sb = _param(bias, x)
    shifted, split_r, wide = not plan.mean_close_to_zero, v.reduced_inner > 1, v.wide
    n, corner = float(v.group_size), float(min(SHIFT_SAMPLE, v.reduced) * cg)
    affine = {"HAS_W": weight is not None, "HAS_B": bias is not None, "ACT": act}
    xs, ys = v.strides
    with _guard(x):
        fused = _fused_tile(v)
        if fused is not None:
            br, bc = fused
            _forward_fused[(k * g,)](
                x, y, w, b, shift, mean, rstd, v.reduced, g, cg, v.kept_inner, v.reduced_inner,
                n, corner, plan.epsilon, *xs, *ys, sw, sb, SAMPLE=SHIFT_SAMPLE, SHIFTED=shifted,
                R_SPLIT=split_r, WIDE=wide, BLOCK_R=br, BLOCK_C=bc, num_warps=_warps(br * bc), **affine,
            )  # fmt: skip
            return y, shift, mean, rstd
        sp = _split(v, x)
        partial = torch.empty((3, k, sp.chunks, v.channels), dtype=torch.float32, device=x.device)
        channel_tiles = -(-v.channels // sp.block_c)
        row_tiles = -(-v.reduced // sp.block_r)
        tile_warps = _warps(sp.block_r * sp.block_c)
        _forward_partial[(k * sp.chunks * channel_tiles,)](
            x, partial[0], partial[1], partial[2], v.reduced, v.channels, v.kept_inner, v.reduced_inner,
            sp.chunks, sp.chunk_rows, sp.iterations, *xs,
            R_SPLIT=split_r, WIDE=wide, BLOCK_R=sp.block_r, BLOCK_C=sp.block_c, num_warps=tile_warps,
        )  # fmt: skip
        bi, bcg = _combine_tile(v, sp.chunks)
        _forward_combine[(k * g,)](
            x, partial[0], partial[1], partial[2], shift, mean, rstd, v.reduced, v.channels, g, cg,
            v.kept_inner, v.reduced_inner, sp.chunks, sp.chunk_rows, n, corner, plan.epsilon, *xs,
            SAMPLE=SHIFT_SAMPLE, SHIFTED=shifted, R_SPLIT=split_r, WIDE=wide, BLOCK_I=bi, BLOCK_C=bcg,
            num_warps=_warps(bi * bcg),
        )  # fmt: skip
        _forward_apply[(k * row_tiles * channel_tiles,)](
            x, y, w, b, shift, mean, rstd, v.reduced, v.channels, g, cg, v.kept_inner, v.reduced_inner,
            row_tiles, *xs, *ys, sw, sb,
            R_SPLIT=split_r, WIDE=wide, BLOCK_R=sp.block_r, BLOCK_C=sp.block_c, num_warps=tile_warps, **affine,
        )  # fmt: skip
    return y, shift, mean, rstd


def backward(
    plan: Plan,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    activation: str | None,
    shift: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dy: torch.Tensor,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(y * dy)`` with respect to ``x``, ``weight`` and ``bias`` (None where not needed)."""
    act = _activation_code(activation)
    need_dx = bool(needs[0])
    need_dw = bool(needs[1]) and weight is not None
    need_db = bool(needs[2]) and bias is not None
    if not (need_dx or need_dw or need_db):
        return None, None, None
    dx_strides = _out_strides(x)
    found = _view(plan, x.shape, [x.stride(), dy.stride(), dx_strides])
    if found is None:  # dy's strides do not merge like x's: read a copy of it in the output's layout
        dy = torch.empty_strided(x.shape, dx_strides, dtype=dy.dtype, device=dy.device).copy_(dy)
        found = _view(plan, x.shape, [x.stride(), dy.stride(), dx_strides])
    v = _require(found)
    k, g, cg, c = v.kept, v.groups, v.group_channels, v.channels
    dx = torch.empty_strided(x.shape, dx_strides, dtype=x.dtype, device=x.device) if need_dx else x
    shift, mean, rstd = (t.contiguous() for t in (shift, mean, rstd))
    w, sw = _param(weight, x)
    b, sb = _param(bias, x)
    split_r, wide = v.reduced_inner > 1, v.wide
    affine = {"HAS_W": weight is not None, "HAS_B": bias is not None, "ACT": act}
    n = float(v.group_size)
    xs, dys, dxs = v.strides
    per_channel = torch.empty((2, k, c), dtype=torch.float32, device=x.device)  # sums of dy' and of dy' * xhat
    with _guard(x):
        fused = _fused_tile(v)
        if fused is not None:
            br, bc = fused
            _backward_fused[(k * g,)](
                x, dy, dx, w, b, shift, mean, rstd, per_channel[0], per_channel[1], v.reduced, c, g, cg,
                v.kept_inner, v.reduced_inner, n, *xs, *dys, *dxs, sw, sb, NEED_DX=need_dx,
                R_SPLIT=split_r, WIDE=wide, BLOCK_R=br, BLOCK_C=bc, num_warps=_warps(br * bc), **affine,
            )  # fmt: skip
        else:
            sp = _split(v, x)
            partial = torch.empty((2, k, sp.chunks, c), dtype=torch.float32, device=x.device)
            channel_tiles = -(-c // sp.block_c)
            row_tiles = -(-v.reduced // sp.block_r)
            tile_warps = _warps(sp.block_r * sp.block_c)
            _backward_partial[(k * sp.chunks * channel_tiles,)](
                x, dy, w, b, shift, mean, rstd, partial[0], partial[1], v.reduced, c, g, cg, v.kept_inner,
                v.reduced_inner, sp.chunks, sp.chunk_rows, sp.iterations, *xs, *dys, sw, sb,
                R_SPLIT=split_r, WIDE=wide, BLOCK_R=sp.block_r, BLOCK_C=sp.block_c, num_warps=tile_warps,
                **affine,
            )  # fmt: skip
            group_means = torch.empty((2, k, g), dtype=torch.float32, device=x.device)
            bi, bcg = _combine_tile(v, sp.chunks)
            _backward_combine[(k * g,)](
                partial[0], partial[1], w, per_channel[0], per_channel[1], group_means[0], group_means[1],
                c, g, cg, sp.chunks, n, sw, HAS_W=weight is not None, BLOCK_I=bi, BLOCK_C=bcg,
                num_warps=_warps(bi * bcg),
            )  # fmt: skip
            if need_dx:
                _backward_apply[(k * row_tiles * channel_tiles,)](
                    x, dy, dx, w, b, shift, mean, rstd, group_means[0], group_means[1], v.reduced, c, g, cg,
                    v.kept_inner, v.reduced_inner, row_tiles, *xs, *dys, *dxs, sw, sb,
                    R_SPLIT=split_r, WIDE=wide, BLOCK_R=sp.block_r, BLOCK_C=sp.block_c, num_warps=tile_warps,
                    **affine,
                )  # fmt: skip
    dweight = per_channel[1].sum(dim=0).to(weight.dtype) if need_dw and weight is not None else None
    dbias = per_channel[0].sum(dim=0).to(bias.dtype) if need_db and bias is not None else None
    return (dx if need_dx else None), dweight, dbias


# --------------------------------------------------------------------------------------------------
# the kernels

if HAVE_TRITON:
    #: Triton's decorator, typed: a kernel is launched as ``kernel[grid](...)``
    _jit = cast("Callable[[Callable[..., Any]], Any]", triton.jit)

    @_jit
    def _row_base(k, kept_inner, s_k1, s_k2):  # type: ignore[no-untyped-def]
        """Offset of kept row ``k``."""
        k1 = k // kept_inner
        return k1 * s_k1 + (k - k1 * kept_inner) * s_k2

    @_jit
    def _tile_offsets(r, c, reduced_inner, s_c, s_ra, s_rb, R_SPLIT: tl.constexpr):  # type: ignore[no-untyped-def]
        """Offsets of reduced positions ``r`` (rows) and channels ``c`` (columns) within a kept row."""
        if R_SPLIT:
            ra = r // reduced_inner
            rows = ra * s_ra + (r - ra * reduced_inner) * s_rb
        else:
            rows = r * s_ra
        return rows[:, None] + (c * s_c)[None, :]

    @_jit
    def _indices(start, BLOCK: tl.constexpr, WIDE: tl.constexpr):  # type: ignore[no-untyped-def]
        i = tl.arange(0, BLOCK)
        if WIDE:
            i = i.to(tl.int64)
        return start + i

    @_jit
    def _program(WIDE: tl.constexpr):  # type: ignore[no-untyped-def]
        pid = tl.program_id(0)
        if WIDE:
            pid = pid.to(tl.int64)
        return pid

    @_jit
    def _activate(v, ACT: tl.constexpr):  # type: ignore[no-untyped-def]
        if ACT == 1:
            out = tl.where(v < 0.0, 0.0, v)
        elif ACT == 2:
            out = v * tl.sigmoid(v)
        elif ACT == 3:
            out = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
        else:
            out = v
        return out

    @_jit
    def _activation_grad(d, v, ACT: tl.constexpr):  # type: ignore[no-untyped-def]
        """``d`` times the activation's derivative at ``v``."""
        if ACT == 1:
            out = tl.where(v <= 0.0, 0.0, d)
        elif ACT == 2:
            s = tl.sigmoid(v)
            out = d * (s * (1.0 + v * (1.0 - s)))
        elif ACT == 3:
            cdf = 0.5 * (1.0 + tl.erf(v * 0.7071067811865476))
            out = d * (cdf + v * tl.exp(-0.5 * v * v) * 0.3989422804014327)
        else:
            out = d
        return out

    @_jit
    def _load_param(p_ptr, c, mask, s_p, fill, HAS: tl.constexpr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        if HAS:
            p = tl.load(p_ptr + c * s_p, mask=mask, other=fill).to(tl.float32)
        else:
            p = tl.full([BLOCK], fill, tl.float32)
        return p

    @_jit
    def _rsqrt_exact(v):  # type: ignore[no-untyped-def]
        return tl.div_rn(1.0, tl.sqrt_rn(v))

    @_jit
    def _finite_or_zero(v):  # type: ignore[no-untyped-def]
        return tl.where(tl.abs(v) <= 3.4028234663852886e38, v, 0.0)

    # ---------------------------------------------------------------------------------- forward

    @_jit
    def _forward_fused(  # type: ignore[no-untyped-def]
        x_ptr, y_ptr, w_ptr, b_ptr, shift_ptr, mean_ptr, rstd_ptr,
        R, G, cg, kept_inner, reduced_inner, n, n_corner, eps,
        xs_k1, xs_k2, xs_c, xs_ra, xs_rb, ys_k1, ys_k2, ys_c, ys_ra, ys_rb, s_w, s_b,
        SAMPLE: tl.constexpr, SHIFTED: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        ACT: tl.constexpr, R_SPLIT: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """One program per group (k, g): the whole group in one tile."""
        pid = _program(WIDE)
        k = pid // G
        g = pid - k * G
        r = _indices(0, BLOCK_R, WIDE)
        j = _indices(0, BLOCK_C, WIDE)
        c = g * cg + j
        cmask = j < cg
        mask = (r < R)[:, None] & cmask[None, :]
        xo = _row_base(k, kept_inner, xs_k1, xs_k2) + _tile_offsets(r, c, reduced_inner, xs_c, xs_ra, xs_rb, R_SPLIT)
        x = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
        if SHIFTED:
            corner = mask & (r < SAMPLE)[:, None]
            shift = _finite_or_zero(tl.sum(tl.sum(tl.where(corner, x, 0.0), 1), 0) / n_corner)
        else:
            shift = 0.0
        t = tl.where(mask, x - shift, 0.0)
        mean = tl.sum(tl.sum(t, 1), 0) / n
        d = tl.where(mask, t - mean, 0.0)
        rstd = _rsqrt_exact(tl.sum(tl.sum(d * d, 1), 0) / n + eps)
        w = _load_param(w_ptr, c, cmask, s_w, 1.0, HAS_W, BLOCK_C)
        b = _load_param(b_ptr, c, cmask, s_b, 0.0, HAS_B, BLOCK_C)
        scale = rstd * w
        offset = b - mean * scale
        out = _activate(t * scale[None, :] + offset[None, :], ACT)
        yo = _row_base(k, kept_inner, ys_k1, ys_k2) + _tile_offsets(r, c, reduced_inner, ys_c, ys_ra, ys_rb, R_SPLIT)
        tl.store(y_ptr + yo, out.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(shift_ptr + pid, shift)
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, rstd)

    @_jit
    def _forward_partial(  # type: ignore[no-untyped-def]
        x_ptr, pshift_ptr, pmean_ptr, pm2_ptr,
        R, C, kept_inner, reduced_inner, chunks, chunk_rows, iterations,
        xs_k1, xs_k2, xs_c, xs_ra, xs_rb,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, R_SPLIT: tl.constexpr, WIDE: tl.constexpr,
    ):  # fmt: skip
        """Per (k, chunk of rows, tile of channels): per channel, a local shift (the chunk's first value),
        the mean of the values less it, and their M2, tile by tile with Chan's update."""
        pid = _program(WIDE)
        channel_tiles = tl.cdiv(C, BLOCK_C)
        ct = pid % channel_tiles
        kc = pid // channel_tiles
        chunk = kc % chunks
        k = kc // chunks
        c = _indices(ct * BLOCK_C, BLOCK_C, WIDE)
        cmask = c < C
        r0 = chunk * chunk_rows
        r_end = tl.minimum(r0 + chunk_rows, R)
        base = x_ptr + _row_base(k, kept_inner, xs_k1, xs_k2)
        first = _tile_offsets(_indices(r0, 1, WIDE), c, reduced_inner, xs_c, xs_ra, xs_rb, R_SPLIT)
        local = tl.sum(tl.load(base + first, mask=cmask[None, :], other=0.0).to(tl.float32), 0)
        mean = tl.zeros([BLOCK_C], tl.float32)
        m2 = tl.zeros([BLOCK_C], tl.float32)
        for it in range(iterations):
            start = r0 + it * BLOCK_R
            r = _indices(start, BLOCK_R, WIDE)
            mask = (r < r_end)[:, None] & cmask[None, :]
            xo = _tile_offsets(r, c, reduced_inner, xs_c, xs_ra, xs_rb, R_SPLIT)
            t = tl.where(mask, tl.load(base + xo, mask=mask, other=0.0).to(tl.float32) - local[None, :], 0.0)
            before = tl.minimum(start - r0, r_end - r0).to(tl.float32)
            count = tl.minimum(tl.maximum(r_end - start, 0), BLOCK_R).to(tl.float32)
            tile_mean = tl.sum(t, 0) / tl.maximum(count, 1.0)
            d = tl.where(mask, t - tile_mean[None, :], 0.0)
            delta = tile_mean - mean
            share = count / tl.maximum(before + count, 1.0)
            mean += delta * share
            m2 += tl.sum(d * d, 0) + delta * delta * (before * share)
        out = kc * C + c
        tl.store(pshift_ptr + out, local, mask=cmask)
        tl.store(pmean_ptr + out, mean, mask=cmask)
        tl.store(pm2_ptr + out, m2, mask=cmask)

    @_jit
    def _forward_combine(  # type: ignore[no-untyped-def]
        x_ptr, pshift_ptr, pmean_ptr, pm2_ptr, shift_ptr, mean_ptr, rstd_ptr,
        R, C, G, cg, kept_inner, reduced_inner, chunks, chunk_rows, n, n_corner, eps,
        xs_k1, xs_k2, xs_c, xs_ra, xs_rb,
        BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr, SAMPLE: tl.constexpr, SHIFTED: tl.constexpr,
        R_SPLIT: tl.constexpr, WIDE: tl.constexpr,
    ):  # fmt: skip
        """Per group (k, g): the shift from the group's corner, then the chunks' statistics combined."""
        pid = _program(WIDE)
        k = pid // G
        g = pid - k * G
        if SHIFTED:
            base = x_ptr + _row_base(k, kept_inner, xs_k1, xs_k2)
            r = _indices(0, SAMPLE, WIDE)
            acc = tl.zeros([SAMPLE, BLOCK_C], tl.float32)
            for j0 in range(0, cg, BLOCK_C):
                j = _indices(j0, BLOCK_C, WIDE)
                mask = (r < R)[:, None] & (j < cg)[None, :]
                xo = _tile_offsets(r, g * cg + j, reduced_inner, xs_c, xs_ra, xs_rb, R_SPLIT)
                acc += tl.load(base + xo, mask=mask, other=0.0).to(tl.float32)
            shift = _finite_or_zero(tl.sum(tl.sum(acc, 1), 0) / n_corner)
        else:
            shift = 0.0
        total = tl.zeros([BLOCK_I, BLOCK_C], tl.float32)
        for j0 in range(0, cg, BLOCK_C):
            j = _indices(j0, BLOCK_C, WIDE)
            for i0 in range(0, chunks, BLOCK_I):
                i = _indices(i0, BLOCK_I, WIDE)
                mask = (i < chunks)[:, None] & (j < cg)[None, :]
                rows = tl.minimum(chunk_rows, R - i * chunk_rows).to(tl.float32)
                at = (k * chunks + i)[:, None] * C + (g * cg + j)[None, :]
                ps = tl.load(pshift_ptr + at, mask=mask, other=0.0)
                pm = tl.load(pmean_ptr + at, mask=mask, other=0.0)
                total += tl.where(mask, rows[:, None] * ((ps - shift) + pm), 0.0)
        mean = tl.sum(tl.sum(total, 1), 0) / n
        m2 = tl.zeros([BLOCK_I, BLOCK_C], tl.float32)
        for j0 in range(0, cg, BLOCK_C):
            j = _indices(j0, BLOCK_C, WIDE)
            for i0 in range(0, chunks, BLOCK_I):
                i = _indices(i0, BLOCK_I, WIDE)
                mask = (i < chunks)[:, None] & (j < cg)[None, :]
                rows = tl.minimum(chunk_rows, R - i * chunk_rows).to(tl.float32)
                at = (k * chunks + i)[:, None] * C + (g * cg + j)[None, :]
                ps = tl.load(pshift_ptr + at, mask=mask, other=0.0)
                pm = tl.load(pmean_ptr + at, mask=mask, other=0.0)
                pm2 = tl.load(pm2_ptr + at, mask=mask, other=0.0)
                dev = (ps - shift) + pm - mean
                m2 += tl.where(mask, pm2 + rows[:, None] * dev * dev, 0.0)
        rstd = _rsqrt_exact(tl.sum(tl.sum(m2, 1), 0) / n + eps)
        tl.store(shift_ptr + pid, shift)
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, rstd)

    @_jit
    def _forward_apply(  # type: ignore[no-untyped-def]
        x_ptr, y_ptr, w_ptr, b_ptr, shift_ptr, mean_ptr, rstd_ptr,
        R, C, G, cg, kept_inner, reduced_inner, row_tiles,
        xs_k1, xs_k2, xs_c, xs_ra, xs_rb, ys_k1, ys_k2, ys_c, ys_ra, ys_rb, s_w, s_b,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, R_SPLIT: tl.constexpr,
        WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """Per tile: ``(x - shift) * scale + offset`` and the activation."""
        pid = _program(WIDE)
        channel_tiles = tl.cdiv(C, BLOCK_C)
        ct = pid % channel_tiles
        kr = pid // channel_tiles
        rt = kr % row_tiles
        k = kr // row_tiles
        r = _indices(rt * BLOCK_R, BLOCK_R, WIDE)
        c = _indices(ct * BLOCK_C, BLOCK_C, WIDE)
        cmask = c < C
        mask = (r < R)[:, None] & cmask[None, :]
        xo = _row_base(k, kept_inner, xs_k1, xs_k2) + _tile_offsets(r, c, reduced_inner, xs_c, xs_ra, xs_rb, R_SPLIT)
        x = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
        at = k * G + c // cg
        shift = tl.load(shift_ptr + at, mask=cmask, other=0.0)
        mean = tl.load(mean_ptr + at, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + at, mask=cmask, other=0.0)
        scale = rstd * _load_param(w_ptr, c, cmask, s_w, 1.0, HAS_W, BLOCK_C)
        offset = _load_param(b_ptr, c, cmask, s_b, 0.0, HAS_B, BLOCK_C) - mean * scale
        out = _activate((x - shift[None, :]) * scale[None, :] + offset[None, :], ACT)
        yo = _row_base(k, kept_inner, ys_k1, ys_k2) + _tile_offsets(r, c, reduced_inner, ys_c, ys_ra, ys_rb, R_SPLIT)
        tl.store(y_ptr + yo, out.to(y_ptr.dtype.element_ty), mask=mask)

    # ---------------------------------------------------------------------------------- backward

    @_jit
    def _backward_terms(  # type: ignore[no-untyped-def]
        x, dy, mask, shift, mean, rstd, w, b, ACT: tl.constexpr
    ):
        """Per element: ``xhat`` and ``dy'``, the gradient before the activation (zero outside ``mask``)."""
        t = x - shift[None, :]
        xhat = (t - mean[None, :]) * rstd[None, :]
        if ACT != 0:
            scale = rstd * w
            pre = t * scale[None, :] + (b - mean * scale)[None, :]
            dy = _activation_grad(dy, pre, ACT)
        return xhat, tl.where(mask, dy, 0.0)

    @_jit
    def _backward_fused(  # type: ignore[no-untyped-def]
        x_ptr, dy_ptr, dx_ptr, w_ptr, b_ptr, shift_ptr, mean_ptr, rstd_ptr, sum_d_ptr, sum_dx_ptr,
        R, C, G, cg, kept_inner, reduced_inner, n,
        xs_k1, xs_k2, xs_c, xs_ra, xs_rb, ds_k1, ds_k2, ds_c, ds_ra, ds_rb,
        os_k1, os_k2, os_c, os_ra, os_rb, s_w, s_b,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, R_SPLIT: tl.constexpr,
        WIDE: tl.constexpr, NEED_DX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """One program per group: the per-channel sums, and the input's gradient."""
        pid = _program(WIDE)
        k = pid // G
        g = pid - k * G
        r = _indices(0, BLOCK_R, WIDE)
        j = _indices(0, BLOCK_C, WIDE)
        c = g * cg + j
        cmask = j < cg
        mask = (r < R)[:, None] & cmask[None, :]
        xo = _row_base(k, kept_inner, xs_k1, xs_k2) + _tile_offsets(r, c, reduced_inner, xs_c, xs_ra, xs_rb, R_SPLIT)
        do = _row_base(k, kept_inner, ds_k1, ds_k2) + _tile_offsets(r, c, reduced_inner, ds_c, ds_ra, ds_rb, R_SPLIT)
        x = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + do, mask=mask, other=0.0).to(tl.float32)
        zero = tl.zeros([BLOCK_C], tl.int32)
        shift = tl.load(shift_ptr + pid + zero)
        mean = tl.load(mean_ptr + pid + zero)
        rstd = tl.load(rstd_ptr + pid + zero)
        w = _load_param(w_ptr, c, cmask, s_w, 1.0, HAS_W, BLOCK_C)
        b = _load_param(b_ptr, c, cmask, s_b, 0.0, HAS_B, BLOCK_C)
        xhat, d = _backward_terms(x, dy, mask, shift, mean, rstd, w, b, ACT)
        sum_d = tl.sum(d, 0)
        sum_dx = tl.sum(d * xhat, 0)
        tl.store(sum_d_ptr + k * C + c, sum_d, mask=cmask)
        tl.store(sum_dx_ptr + k * C + c, sum_dx, mask=cmask)
        if NEED_DX:
            mean_d = tl.sum(w * sum_d, 0) / n
            mean_dx = tl.sum(w * sum_dx, 0) / n
            dx = rstd[None, :] * (w[None, :] * d - mean_d - xhat * mean_dx)
            oo = _row_base(k, kept_inner, os_k1, os_k2) + _tile_offsets(
                r, c, reduced_inner, os_c, os_ra, os_rb, R_SPLIT
            )
            tl.store(dx_ptr + oo, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    @_jit
    def _backward_partial(  # type: ignore[no-untyped-def]
        x_ptr, dy_ptr, w_ptr, b_ptr, shift_ptr, mean_ptr, rstd_ptr, psum_d_ptr, psum_dx_ptr,
        R, C, G, cg, kept_inner, reduced_inner, chunks, chunk_rows, iterations,
        xs_k1, xs_k2, xs_c, xs_ra, xs_rb, ds_k1, ds_k2, ds_c, ds_ra, ds_rb, s_w, s_b,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, R_SPLIT: tl.constexpr,
        WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """Per (k, chunk of rows, tile of channels): per channel, the sums of dy' and dy' * xhat."""
        pid = _program(WIDE)
        channel_tiles = tl.cdiv(C, BLOCK_C)
        ct = pid % channel_tiles
        kc = pid // channel_tiles
        chunk = kc % chunks
        k = kc // chunks
        c = _indices(ct * BLOCK_C, BLOCK_C, WIDE)
        cmask = c < C
        at = k * G + c // cg
        shift = tl.load(shift_ptr + at, mask=cmask, other=0.0)
        mean = tl.load(mean_ptr + at, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + at, mask=cmask, other=0.0)
        w = _load_param(w_ptr, c, cmask, s_w, 1.0, HAS_W, BLOCK_C)
        b = _load_param(b_ptr, c, cmask, s_b, 0.0, HAS_B, BLOCK_C)
        r0 = chunk * chunk_rows
        r_end = tl.minimum(r0 + chunk_rows, R)
        x_base = x_ptr + _row_base(k, kept_inner, xs_k1, xs_k2)
        dy_base = dy_ptr + _row_base(k, kept_inner, ds_k1, ds_k2)
        acc_d = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        acc_dx = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        for it in range(iterations):
            r = _indices(r0 + it * BLOCK_R, BLOCK_R, WIDE)
            mask = (r < r_end)[:, None] & cmask[None, :]
            xo = _tile_offsets(r, c, reduced_inner, xs_c, xs_ra, xs_rb, R_SPLIT)
            do = _tile_offsets(r, c, reduced_inner, ds_c, ds_ra, ds_rb, R_SPLIT)
            x = tl.load(x_base + xo, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_base + do, mask=mask, other=0.0).to(tl.float32)
            xhat, d = _backward_terms(x, dy, mask, shift, mean, rstd, w, b, ACT)
            acc_d += d
            acc_dx += d * xhat
        out = kc * C + c
        tl.store(psum_d_ptr + out, tl.sum(acc_d, 0), mask=cmask)
        tl.store(psum_dx_ptr + out, tl.sum(acc_dx, 0), mask=cmask)

    @_jit
    def _backward_combine(  # type: ignore[no-untyped-def]
        psum_d_ptr, psum_dx_ptr, w_ptr, sum_d_ptr, sum_dx_ptr, mean_d_ptr, mean_dx_ptr,
        C, G, cg, chunks, n, s_w,
        HAS_W: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """Per group (k, g): the chunks' sums per channel, and the group means of gamma dy' and of
        gamma dy' xhat."""
        pid = tl.program_id(0)
        k = pid // G
        g = pid - k * G
        group_d = tl.zeros([BLOCK_C], tl.float32)
        group_dx = tl.zeros([BLOCK_C], tl.float32)
        for j0 in range(0, cg, BLOCK_C):
            j = j0 + tl.arange(0, BLOCK_C)
            cmask = j < cg
            c = g * cg + j
            acc_d = tl.zeros([BLOCK_I, BLOCK_C], tl.float32)
            acc_dx = tl.zeros([BLOCK_I, BLOCK_C], tl.float32)
            for i0 in range(0, chunks, BLOCK_I):
                i = i0 + tl.arange(0, BLOCK_I)
                mask = (i < chunks)[:, None] & cmask[None, :]
                at = (k * chunks + i)[:, None] * C + c[None, :]
                acc_d += tl.load(psum_d_ptr + at, mask=mask, other=0.0)
                acc_dx += tl.load(psum_dx_ptr + at, mask=mask, other=0.0)
            sum_d = tl.sum(acc_d, 0)
            sum_dx = tl.sum(acc_dx, 0)
            tl.store(sum_d_ptr + k * C + c, sum_d, mask=cmask)
            tl.store(sum_dx_ptr + k * C + c, sum_dx, mask=cmask)
            w = _load_param(w_ptr, c, cmask, s_w, 1.0, HAS_W, BLOCK_C)
            group_d += tl.where(cmask, w * sum_d, 0.0)
            group_dx += tl.where(cmask, w * sum_dx, 0.0)
        tl.store(mean_d_ptr + pid, tl.sum(group_d, 0) / n)
        tl.store(mean_dx_ptr + pid, tl.sum(group_dx, 0) / n)

    @_jit
    def _backward_apply(  # type: ignore[no-untyped-def]
        x_ptr, dy_ptr, dx_ptr, w_ptr, b_ptr, shift_ptr, mean_ptr, rstd_ptr, mean_d_ptr, mean_dx_ptr,
        R, C, G, cg, kept_inner, reduced_inner, row_tiles,
        xs_k1, xs_k2, xs_c, xs_ra, xs_rb, ds_k1, ds_k2, ds_c, ds_ra, ds_rb,
        os_k1, os_k2, os_c, os_ra, os_rb, s_w, s_b,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, R_SPLIT: tl.constexpr,
        WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """Per tile: ``dx = rstd * (gamma dy' - mean_g(gamma dy') - xhat * mean_g(gamma dy' xhat))``."""
        pid = _program(WIDE)
        channel_tiles = tl.cdiv(C, BLOCK_C)
        ct = pid % channel_tiles
        kr = pid // channel_tiles
        rt = kr % row_tiles
        k = kr // row_tiles
        r = _indices(rt * BLOCK_R, BLOCK_R, WIDE)
        c = _indices(ct * BLOCK_C, BLOCK_C, WIDE)
        cmask = c < C
        mask = (r < R)[:, None] & cmask[None, :]
        xo = _row_base(k, kept_inner, xs_k1, xs_k2) + _tile_offsets(r, c, reduced_inner, xs_c, xs_ra, xs_rb, R_SPLIT)
        do = _row_base(k, kept_inner, ds_k1, ds_k2) + _tile_offsets(r, c, reduced_inner, ds_c, ds_ra, ds_rb, R_SPLIT)
        x = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + do, mask=mask, other=0.0).to(tl.float32)
        at = k * G + c // cg
        shift = tl.load(shift_ptr + at, mask=cmask, other=0.0)
        mean = tl.load(mean_ptr + at, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + at, mask=cmask, other=0.0)
        mean_d = tl.load(mean_d_ptr + at, mask=cmask, other=0.0)
        mean_dx = tl.load(mean_dx_ptr + at, mask=cmask, other=0.0)
        w = _load_param(w_ptr, c, cmask, s_w, 1.0, HAS_W, BLOCK_C)
        b = _load_param(b_ptr, c, cmask, s_b, 0.0, HAS_B, BLOCK_C)
        xhat, d = _backward_terms(x, dy, mask, shift, mean, rstd, w, b, ACT)
        dx = rstd[None, :] * (w[None, :] * d - mean_d[None, :] - xhat * mean_dx[None, :])
        oo = _row_base(k, kept_inner, os_k1, os_k2) + _tile_offsets(r, c, reduced_inner, os_c, os_ra, os_rb, R_SPLIT)
        tl.store(dx_ptr + oo, dx.to(dx_ptr.dtype.element_ty), mask=mask)
