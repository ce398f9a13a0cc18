"""PyTorch backend: executes a plan on ``torch.Tensor`` inputs, with a hand-written backward pass.

Numerics follow the NumPy reference: in the default mode each group is shifted by a rough mean ``K``
(the mean of a small corner of the group, so ``x - K`` is exact for values near the mean), the mean and
variance of ``x - K`` are accumulated in float32 (float64 for float64 input), and the output is formed
as ``(x - K) * scale + offset``. ``mean_close_to_zero=True`` skips the shift.

Four ways to run a plan, tried in this order:

- groupnorm's compiled CPU kernel (:mod:`groupnorm.backends._cpu_kernel`), for float32 input on the CPU
  whose memory order is ``(kept, reduced, channels, reduced)``: NCHW, channels-last NCHW, NHWC and the
  like. Exact shifted statistics, one read of the input for them and one read and one write for the
  output. Built on first use with the system's C compiler; without one, the paths below run.
- torch's own kernel (``torch.native_group_norm`` and its backward), only for contiguous ``(N, C, *)``
  float32/float64 input and, in float32, only when every group's ``|mean| / std`` is at most
  :data:`NATIVE_MEAN_BOUND` (checked on the statistics the kernel returns), where its error stays within
  about 1.2e-6 of float64. A glance at each group's corner first skips it where that check would fail.
- the blocked path: the input in its memory order (a channels-last tensor is processed as the NHWC array
  it is, and the output keeps its layout), in blocks of whole groups small enough to stay in cache: each
  block is shifted into the output buffer, reduced, and scaled in place, so the input crosses the memory
  bus once and the output once. The backward pass works the same way.
- the composite: differentiable ``torch`` operations with the same numerics, for ``torch.compile``,
  ``torch.export``, ONNX export and higher-order gradients.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from groupnorm._plan import Activation, Plan
from groupnorm.backends import _cpu_kernel

NAME = "torch"

__all__ = ["execute", "is_array"]

#: elements per block of the blocked CPU path (16 MiB of float32): a block and its scratch stay in the last-level
#: cache, and the operations per block are few enough that few parallel regions are started.
BLOCK_ELEMENTS = 1 << 22

#: whether to use torch's own kernel where it is provably accurate (tests turn it off to check the rest).
NATIVE = True

#: whether to use groupnorm's compiled CPU kernel for float32 where it is available (likewise).
KERNEL = True

#: whether the kernel may ask Linux to back its large outputs with transparent huge pages (one page fault
#: per 2 MiB instead of per 4 KiB when the output is first written; ``GROUPNORM_HUGE_PAGES=0`` turns it off).
HUGE_PAGES = os.environ.get("GROUPNORM_HUGE_PAGES", "1") != "0"

#: per reduced axis, how many leading elements the rough shift ``K`` averages.
_SHIFT_SAMPLE = 8

_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}


def is_array(x: object) -> bool:
    return isinstance(x, torch.Tensor)


def static_shape(x: torch.Tensor) -> tuple[int | None, ...]:
    return tuple(d if isinstance(d, int) else None for d in x.shape)


def dtype_name(x: torch.Tensor) -> str:
    return _DTYPE_NAMES.get(x.dtype, str(x.dtype).removeprefix("torch."))


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# activations


def _activate_(y: torch.Tensor, name: str) -> torch.Tensor:
    """Apply a fusable activation to ``y`` in place (returns ``y``)."""
    if name == "relu":
        return y.relu_()
    if name == "silu":
        return F.silu(y, inplace=True)
    return y.copy_(F.gelu(y))


def _activate(y: torch.Tensor, name: str) -> torch.Tensor:
    if name == "relu":
        return torch.relu(y)
    if name == "silu":
        return F.silu(y)
    return F.gelu(y)


def _activation_grad(pre: torch.Tensor, name: str) -> torch.Tensor:
    """The activation's derivative at ``pre`` (a fresh tensor)."""
    if name == "relu":
        return (pre > 0).to(pre.dtype)
    if name == "silu":
        s = torch.sigmoid(pre)
        return s * (1 + pre * (1 - s))
    cdf = 0.5 * (1 + torch.erf(pre * (1 / math.sqrt(2))))
    return cdf + pre * torch.exp(-0.5 * pre * pre) * (1 / math.sqrt(2 * math.pi))


# --------------------------------------------------------------------------------------------------
# the composite path: differentiable torch operations, used for tracing and higher-order gradients


def _corner(z: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """The leading corner (up to ``_SHIFT_SAMPLE`` elements along each of ``dims``) of ``z``."""
    for d in dims:
        z = z.narrow(d, 0, min(_SHIFT_SAMPLE, int(z.shape[d])))
    return z


def composite(
    plan: Plan, x: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None, activation: str | None
) -> torch.Tensor:
    """The plan as differentiable ``torch`` operations (any layout; what tracing and autograd see)."""
    work = _work_dtype(x.dtype)
    xs = x.reshape(plan.split_shape(x.shape)).to(work)
    dims = plan.split_reduce_axes
    # the rough shift is a constant: the result does not depend on it, so neither do gradients
    z = xs if plan.mean_close_to_zero else xs - _corner(xs, dims).mean(dim=dims, keepdim=True).detach()
    mean = z.mean(dim=dims, keepdim=True)
    var = torch.clamp((z * z).mean(dim=dims, keepdim=True) - mean * mean, min=0)
    scale = torch.rsqrt(var + plan.epsilon)
    if gamma is not None:
        scale = scale * gamma.to(work).reshape(plan.param_shape)
    offset = -mean * scale
    if beta is not None:
        offset = offset + beta.to(work).reshape(plan.param_shape)
    y = z * scale + offset
    if activation is not None:
        y = _activate(y, activation)
    return y.reshape(x.shape).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# the blocked path: the input in memory order, viewed as runs of kept axes, the channel axis, and runs
# of reduced axes. Statistics are summed per channel over the reduced axes, then per group over its
# channels; every coefficient is per channel, so that it broadcasts along contiguous memory.

_KEPT, _CHANNEL, _REDUCED = "k", "c", "r"

#: per-thread scratch buffers of the blocked path
_SCRATCH = threading.local()


@dataclass(frozen=True)
class _Layout:
    """How the blocked path views an input permuted into memory order."""

    perm: tuple[int, ...]
    """``x.permute(perm)`` is in memory order."""
    inverse: tuple[int, ...]
    runs: tuple[tuple[int, int], ...]
    """Runs of like axes of the permuted input, merged into one axis of the compute view."""
    classes: tuple[str, ...]
    """Per compute-view axis: kept, channel or reduced."""
    channels: int
    group_channels: int

    @property
    def channel_dim(self) -> int:
        return self.classes.index(_CHANNEL)

    @property
    def reduce_dims(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.classes) if c == _REDUCED)

    @property
    def kept_dims(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.classes) if c == _KEPT)

    @property
    def param_shape(self) -> tuple[int, ...]:
        return tuple(self.channels if c == _CHANNEL else 1 for c in self.classes)

    def view_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(math.prod(shape[a:b]) for a, b in self.runs)

    def coef_shape(self, view: Sequence[int]) -> tuple[int, ...]:
        return tuple(1 if c == _REDUCED else d for d, c in zip(view, self.classes, strict=True))


@lru_cache(maxsize=512)
def _layout(plan: Plan, perm: tuple[int, ...]) -> _Layout:
    reduced = set(plan.reduction_axes)
    axis_classes = [_CHANNEL if p == plan.channels_axis else _REDUCED if p in reduced else _KEPT for p in perm]
    runs: list[tuple[int, int]] = []
    classes: list[str] = []
    for i, cls in enumerate(axis_classes):
        if classes and classes[-1] == cls:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
            classes.append(cls)
    inverse = tuple(sorted(range(len(perm)), key=perm.__getitem__))
    return _Layout(perm, inverse, tuple(runs), tuple(classes), plan.channels, plan.group_channels)


def _memory_order(x: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor]:
    """A permutation putting ``x``'s axes in memory order, and ``x`` permuted (and made contiguous)."""
    strides = x.stride()
    perm = tuple(sorted(range(x.dim()), key=lambda a: (-strides[a] if x.shape[a] != 1 else 0, a)))
    xp = x.permute(perm)
    if not xp.is_contiguous():
        perm = tuple(range(x.dim()))
        xp = x.contiguous()
    return perm, xp


def _blocks(view: Sequence[int], layout: _Layout, budget: int) -> list[tuple[slice, ...]]:
    """Slices of the leading axes of the compute view: blocks of whole groups, about ``budget`` elements."""
    total = math.prod(view)
    classes = layout.classes
    if total <= budget or classes[0] == _REDUCED or total == 0:
        return [(slice(None),)]
    cg = layout.group_channels

    def channel_steps(per_channel: int) -> list[slice]:
        step = max(1, budget // max(per_channel * cg, 1)) * cg
        return [slice(j, j + step) for j in range(0, layout.channels, step)]

    if classes[0] == _CHANNEL:
        return [(s,) for s in channel_steps(total // layout.channels)]
    inner = total // view[0]
    if inner > budget and classes[1] == _CHANNEL:
        steps = channel_steps(inner // layout.channels)
        return [(slice(i, i + 1), s) for i in range(view[0]) for s in steps]
    step = max(1, budget // max(inner, 1))
    return [(slice(i, i + step),) for i in range(0, view[0], step)]


@dataclass
class _Saved:
    layout: _Layout
    shift: torch.Tensor | None
    """Per channel (its group's value), in the compute view's coefficient shape; None without a shift."""
    mean: torch.Tensor
    """Per channel, the mean of ``x - shift`` over its group."""
    rstd: torch.Tensor


class _Blocked:
    """Shared set-up of the blocked forward and backward passes."""

    def __init__(
        self, plan: Plan, layout: _Layout, xp: torch.Tensor, budget: int | None, work: torch.dtype | None = None
    ) -> None:
        self.plan, self.layout = plan, layout
        self.view = layout.view_shape(xp.shape)
        self.work = work or _work_dtype(xp.dtype)
        self.same = self.work == xp.dtype
        self.cdim = layout.channel_dim
        self.rdims = layout.reduce_dims
        self.coef = layout.coef_shape(self.view)
        if budget is None:
            budget = BLOCK_ELEMENTS if xp.device.type == "cpu" else math.prod(self.view)
        self.blocks = _blocks(self.view, layout, budget)
        self.device = xp.device

    def block_size(self) -> int:
        sizes = [
            math.prod(len(range(*s.indices(d))) for s, d in zip(b, self.view, strict=False))
            * math.prod(self.view[len(b) :])
            for b in self.blocks
        ]
        return max(sizes)

    def scratch(self, slot: int) -> torch.Tensor:
        """A block-sized scratch buffer, kept between calls (per thread) so that its pages stay mapped."""
        size = self.block_size()
        if self.device.type != "cpu" or size > 4 * BLOCK_ELEMENTS:
            return torch.empty(size, dtype=self.work, device=self.device)
        cache: dict[tuple[int, torch.dtype], torch.Tensor] = _SCRATCH.__dict__.setdefault("buffers", {})
        buf = cache.get((slot, self.work))
        if buf is None or buf.numel() < size:
            buf = cache[(slot, self.work)] = torch.empty(size, dtype=self.work)
        return buf[:size]

    def rows(self) -> bool:
        """Whether the reduced axes are the last and only reduced run (each channel is one row)."""
        return self.rdims == (len(self.view) - 1,)

    def sum_of_squares(self, z: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        """Per channel: the sum of ``z * z`` over the reduced axes."""
        if self.rows():
            norm: torch.Tensor = torch.linalg.vector_norm(z, 2, dim=-1, keepdim=True)
            return norm.square_()
        return self.rsum(torch.mul(z, z, out=buf[: z.numel()].view(z.shape)))

    def scale_shift_(self, y: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """``y * scale + offset`` in place, with the faster of the two forms for the layout."""
        if self.rows():
            return y.mul_(scale).add_(offset)
        return torch.addcmul(offset, y, scale, out=y)

    def param(self, p: torch.Tensor | None) -> torch.Tensor | None:
        return None if p is None else p.detach().to(self.work).reshape(self.layout.param_shape)

    def param_block(self, p: torch.Tensor | None, block: tuple[slice, ...]) -> torch.Tensor | None:
        if p is None or len(block) <= self.cdim:
            return p
        index = [slice(None)] * p.dim()
        index[self.cdim] = block[self.cdim]
        return p[tuple(index)]

    def rsum(self, t: torch.Tensor) -> torch.Tensor:
        """Per channel: the sum over the reduced axes."""
        return t.sum(dim=self.rdims, keepdim=True) if self.rdims else t

    def group_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Per channel (coefficient shape): the sum of ``t`` over the channels of the channel's group."""
        moved = t.movedim(self.cdim, -1)
        grouped = moved.reshape(*moved.shape[:-1], -1, self.layout.group_channels)
        summed = grouped.sum(dim=-1, keepdim=True).expand(grouped.shape).contiguous().flatten(-2)
        return summed.movedim(-1, self.cdim)


def blocked_forward(
    plan: Plan,
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    activation: str | None,
    budget: int | None = None,
    work: torch.dtype | None = None,
) -> tuple[torch.Tensor, _Saved]:
    """Forward pass in memory order and in cache-sized blocks of whole groups (no autograd), with the
    statistics in ``work`` (by default float32, float64 for float64 input)."""
    perm, xp = _memory_order(x)
    layout = _layout(plan, perm)
    bk = _Blocked(plan, layout, xp, budget, work)
    xv = xp.view(bk.view)
    out = torch.empty(xp.shape, dtype=x.dtype, device=x.device)
    ov = out.view(bk.view)
    n = plan.group_size
    shift = None
    if not plan.mean_close_to_zero:
        corner = _corner(xv, bk.rdims).to(bk.work)
        per_channel = bk.rsum(corner) / math.prod(corner.shape[d] for d in bk.rdims)
        shift = bk.group_sum(per_channel).div_(layout.group_channels).contiguous()
    mean = torch.empty(bk.coef, dtype=bk.work, device=x.device)
    rstd = torch.empty(bk.coef, dtype=bk.work, device=x.device)
    g, b = bk.param(gamma), bk.param(beta)
    buf = bk.scratch(0)
    tmp = None if bk.same else bk.scratch(1)
    for block in bk.blocks:
        xc, oc = xv[block], ov[block]
        if tmp is not None:  # a half-precision block, widened in scratch (copy_ casts without a temporary)
            z = tmp[: xc.numel()].view(xc.shape).copy_(xc)
            if shift is not None:
                z.sub_(shift[block])
        elif shift is None:
            z = xc
        else:
            z = torch.sub(xc, shift[block], out=oc)
        # the large reductions back to back, then the small per-channel arithmetic
        s1, s2 = bk.rsum(z), bk.sum_of_squares(z, buf)
        m = bk.group_sum(s1).div_(n)
        var = bk.group_sum(s2).div_(n).sub_(m * m).clamp_(min=0)
        r = var.add_(plan.epsilon).rsqrt_()
        gc, bc = bk.param_block(g, block), bk.param_block(b, block)
        scale = r if gc is None else r * gc
        offset = -m * scale if bc is None else bc - m * scale
        if z.data_ptr() == oc.data_ptr() or tmp is not None:
            y = bk.scale_shift_(z, scale, offset)
        else:
            y = torch.mul(z, scale, out=oc).add_(offset)
        if activation is not None:
            _activate_(y, activation)
        if y.data_ptr() != oc.data_ptr():
            oc.copy_(y)
        mean[block] = m
        rstd[block] = r
    return out.permute(layout.inverse), _Saved(layout, shift, mean, rstd)


def blocked_backward(
    plan: Plan,
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    activation: str | None,
    saved: _Saved,
    dy: torch.Tensor,
    needs: tuple[bool, bool, bool],
    budget: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients with respect to ``x``, ``gamma`` and ``beta`` of the blocked forward pass."""
    layout = saved.layout
    xp = x.permute(layout.perm)
    if not xp.is_contiguous():
        xp = xp.contiguous()
    dyp = dy.permute(layout.perm)
    if not dyp.is_contiguous():
        dyp = dyp.contiguous()
    bk = _Blocked(plan, layout, xp, budget, saved.mean.dtype)
    xv, dyv = xp.view(bk.view), dyp.view(bk.view)
    n = plan.group_size
    g, b = bk.param(gamma), bk.param(beta)
    dx = torch.empty(xp.shape, dtype=x.dtype, device=x.device) if needs[0] else None
    dxv = None if dx is None else dx.view(bk.view)
    sum_d = torch.empty(bk.coef, dtype=bk.work, device=x.device)
    sum_dxhat = torch.empty(bk.coef, dtype=bk.work, device=x.device)
    shift, mean, rstd = saved.shift, saved.mean, saved.rstd
    buf = bk.scratch(0)
    tmp = None if bk.same and dxv is not None else bk.scratch(1)
    for block in bk.blocks:
        xc, dyc = xv[block], dyv[block]
        m, r = mean[block], rstd[block]
        gc = bk.param_block(g, block)
        if tmp is not None:
            scratch = tmp[: xc.numel()].view(xc.shape)
        else:
            assert dxv is not None
            scratch = dxv[block]
        # z = x - K in the work dtype
        if bk.same:
            z = xc if shift is None else torch.sub(xc, shift[block], out=scratch)
        else:
            z = scratch.copy_(xc) if shift is None else scratch.copy_(xc).sub_(shift[block])
        d = dyc if dyc.dtype == bk.work else dyc.to(bk.work)
        if activation is not None:
            scale = r if gc is None else r * gc
            bc = bk.param_block(b, block)
            offset = -m * scale if bc is None else bc - m * scale
            pre = torch.mul(z, scale, out=buf[: z.numel()].view(z.shape)).add_(offset)
            d = d * _activation_grad(pre, activation)
        a = bk.rsum(d)
        dz = bk.rsum(torch.mul(d, z, out=buf[: z.numel()].view(z.shape)))
        dxhat = (dz - m * a).mul_(r)  # per channel: the sum of d * xhat
        sum_d[block] = a
        sum_dxhat[block] = dxhat
        if dxv is not None:
            ga = a if gc is None else a * gc
            gx = dxhat if gc is None else dxhat * gc
            mg = bk.group_sum(ga).div_(n)
            mgx = bk.group_sum(gx).div_(n)
            coef_a = r if gc is None else r * gc
            coef_b = -r * r * mgx
            coef_c = r * (r * m * mgx - mg)
            t = torch.mul(z, coef_b, out=scratch).add_(coef_c).addcmul_(d, coef_a)
            if t.data_ptr() != dxv[block].data_ptr():
                dxv[block] = t
    kept = layout.kept_dims
    dgamma = dbeta = None
    if needs[1] and gamma is not None:
        dgamma = (sum_dxhat.sum(dim=kept) if kept else sum_dxhat).reshape(-1).to(gamma.dtype)
    if needs[2] and beta is not None:
        dbeta = (sum_d.sum(dim=kept) if kept else sum_d).reshape(-1).to(beta.dtype)
    return (None if dx is None else dx.permute(layout.inverse)), dgamma, dbeta


# --------------------------------------------------------------------------------------------------
# the compiled CPU kernel: float32 input whose memory order is (kept, reduced, channels, reduced), such as
# NCHW, NHWC and channels-last NCHW; see _cpu_kernel.c


@dataclass
class _Kernel:
    """What the kernel's forward pass saved: per (kept row, group) its shift, mean and rstd."""

    layout: _Layout
    geometry: tuple[int, int, int, int]
    shift: torch.Tensor
    mean: torch.Tensor
    rstd: torch.Tensor
    pre: torch.Tensor | None = None
    """The output before the activation, kept when a gradient will be asked for."""


def _kernel_geometry(layout: _Layout, view: Sequence[int]) -> tuple[int, int, int, int] | None:
    """The compute view as the kernel's ``(K, A, C, B)``, where its runs are ``[kept] [reduced] channels
    [reduced]`` once runs of length 1 (which move no memory) are left out."""
    runs: list[tuple[str, int]] = []
    for cls, size in zip(layout.classes, view, strict=True):
        if size == 1 and cls != _CHANNEL:
            continue
        if runs and runs[-1][0] == cls:
            runs[-1] = (cls, runs[-1][1] * size)
        else:
            runs.append((cls, size))
    k = runs.pop(0)[1] if runs[0][0] == _KEPT else 1
    a = runs.pop(0)[1] if runs[0][0] == _REDUCED else 1
    if runs[0][0] != _CHANNEL or [cls for cls, _ in runs[1:]] not in ([], [_REDUCED]):
        return None
    return k, a, runs[0][1], runs[1][1] if len(runs) > 1 else 1


def _kernel_param(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None else p.detach().to(torch.float32).contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _fresh(lib: Any, shape: Sequence[int]) -> torch.Tensor:
    """A new float32 CPU tensor, not yet written, backed by huge pages where :data:`HUGE_PAGES` allows."""
    t = torch.empty(shape, dtype=torch.float32)
    if HUGE_PAGES:
        lib.groupnorm_prefer_huge_pages(t.data_ptr(), t.numel() * 4)
    return t


def _fresh_like(lib: Any, like: torch.Tensor) -> torch.Tensor:
    """:func:`_fresh` with the memory layout of ``like`` (a permutation of a contiguous tensor)."""
    return _fresh(lib, like.shape).as_strided(like.shape, like.stride())


def _kernel_forward(
    plan: Plan,
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    activation: str | None,
    keep_pre: bool = False,
) -> tuple[torch.Tensor, _Kernel] | None:
    """The compiled kernel's forward pass, where it applies and is available."""
    if not KERNEL or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    perm, xp = _memory_order(x)
    layout = _layout(plan, perm)
    geometry = _kernel_geometry(layout, layout.view_shape(xp.shape))
    lib = None if geometry is None else _cpu_kernel.load()
    if lib is None or geometry is None:
        return None
    k, a, c, b = geometry
    g, w, bias = plan.groups, _kernel_param(gamma), _kernel_param(beta)
    out = _fresh(lib, xp.shape)
    shift, mean, rstd = (torch.empty(k, g) for _ in range(3))
    status = lib.groupnorm_forward_f32(
        xp.data_ptr(), out.data_ptr(), k, a, c, b, g, _ptr(w), _ptr(bias), plan.epsilon,
        int(not plan.mean_close_to_zero), shift.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("groupnorm: out of memory for the CPU kernel's statistics")
    y = out.permute(layout.inverse)
    pre = None
    if activation is not None:
        if keep_pre:
            pre, y = y, _ACTIVATION_OUT[activation](y, _fresh_like(lib, y))
        else:
            _activate_(y, activation)
    return y, _Kernel(layout, geometry, shift, mean, rstd, pre)


def _kernel_backward(
    plan: Plan,
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    activation: str | None,
    saved: _Kernel,
    dy: torch.Tensor,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    lib = _cpu_kernel.load()
    assert lib is not None  # the forward pass loaded it
    if activation is not None:
        assert saved.pre is not None  # kept by the forward pass whenever a gradient can be asked for
        dy = _ACTIVATION_GRAD_OUT[activation](dy.to(torch.float32), saved.pre, _fresh_like(lib, saved.pre))
    layout = saved.layout
    xp, dyp = x.permute(layout.perm).contiguous(), dy.permute(layout.perm).to(torch.float32).contiguous()
    k, a, c, b = saved.geometry
    w = _kernel_param(gamma)
    dx = _fresh(lib, xp.shape) if needs[0] else None
    dgamma = torch.empty(c) if needs[1] and gamma is not None else None
    dbeta = torch.empty(c) if needs[2] and beta is not None else None
    status = lib.groupnorm_backward_f32(
        xp.data_ptr(), dyp.data_ptr(), _ptr(dx), k, a, c, b, plan.groups, _ptr(w),
        saved.shift.data_ptr(), saved.mean.data_ptr(), saved.rstd.data_ptr(), _ptr(dgamma), _ptr(dbeta),
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("groupnorm: out of memory for the CPU kernel's statistics")
    return (
        None if dx is None else dx.permute(layout.inverse),
        None if dgamma is None or gamma is None else dgamma.to(gamma.dtype),
        None if dbeta is None or beta is None else dbeta.to(beta.dtype),
    )


# --------------------------------------------------------------------------------------------------
# autograd and dispatch


#: Largest ``|mean| / std`` of any group (``|mean| * rstd``) for which torch's own CPU group norm on a
#: contiguous float32 input stays within about 1.2e-6 of float64 (it forms ``x * a + b``, which loses
#: digits to cancellation as the mean grows; its statistics use a stable cascaded Welford update).
NATIVE_MEAN_BOUND = 4.0


@dataclass
class _Native:
    """What torch's native group norm saved: the input as it saw it, and its statistics."""

    order: tuple[int, ...]
    inverse: tuple[int, ...]
    unsqueezed: bool
    xn: torch.Tensor
    mean: torch.Tensor
    rstd: torch.Tensor
    pre: torch.Tensor | None = None
    """The output before the activation, kept when a gradient will be asked for."""


def _native_view(plan: Plan, x: torch.Tensor) -> tuple[tuple[int, ...], bool, torch.Tensor] | None:
    """``x`` as torch's ``(N, C, *)`` contiguous group norm sees it, where the plan is that layout."""
    if x.dtype not in (torch.float32, torch.float64) or len(plan.kept_axes) > 1:
        return None
    order = (*plan.kept_axes, plan.channels_axis, *plan.reduction_axes)
    xn = x.permute(order)
    unsqueezed = not plan.kept_axes
    if unsqueezed:
        xn = xn.unsqueeze(0)
    if not xn.is_contiguous():
        return None
    return order, unsqueezed, xn


def _native_forward(
    plan: Plan,
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    activation: str | None,
    keep_pre: bool = False,
) -> tuple[torch.Tensor, _Native] | None:
    """torch's own kernel, where the layout is its own and the result is provably within ~1e-6.

    With ``keep_pre`` the output before the activation is kept for the backward pass (which then needs
    one fused activation-gradient kernel instead of recomputing it), at the cost of a separate output.
    """
    found = _native_view(plan, x)
    if found is None:
        return None
    order, unsqueezed, xn = found
    n, c = int(xn.shape[0]), int(xn.shape[1])
    hxw = math.prod(int(d) for d in xn.shape[2:])
    check = not plan.mean_close_to_zero and x.dtype == torch.float32
    if check and hxw > 1:
        # A look at each group's leading corner first: where even it shows a mean far from zero
        # against its spread, go straight to the exact path instead of computing twice.
        corner = xn
        for d in range(2, xn.dim() - 1):
            corner = corner.narrow(d, 0, 1)
        corner = corner.narrow(-1, 0, min(_SHIFT_SAMPLE, int(xn.shape[-1]))).reshape(n, plan.groups, -1)
        var, mean = torch.var_mean(corner, dim=-1, correction=0)
        if not bool((mean.abs() <= NATIVE_MEAN_BOUND * 2 * var.sqrt()).all()):
            return None
    w = None if gamma is None else gamma.detach().to(x.dtype)
    b = None if beta is None else beta.detach().to(x.dtype)
    y, mean, rstd = torch.native_group_norm(xn, w, b, n, c, hxw, plan.groups, plan.epsilon)
    if check:
        worst = (mean.abs() * rstd).max()
        # NaN fails too, and so does a variance that overflowed (rstd 0): the exact path decides then
        if not bool(worst <= NATIVE_MEAN_BOUND) or not bool(rstd.min() > 0):
            return None
    pre = None
    if activation is not None:
        if keep_pre:
            pre, y = y, _activate(y, activation)
        else:
            _activate_(y, activation)
    if unsqueezed:
        y = y.squeeze(0)
    inverse = tuple(sorted(range(len(order)), key=order.__getitem__))
    return y.permute(inverse), _Native(order, inverse, unsqueezed, xn, mean, rstd, pre)


def _native_backward(
    plan: Plan,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    activation: str | None,
    saved: _Native,
    dy: torch.Tensor,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    xn = saved.xn
    n, c = int(xn.shape[0]), int(xn.shape[1])
    hxw = math.prod(int(d) for d in xn.shape[2:])
    dyn = dy.permute(saved.order)
    if saved.unsqueezed:
        dyn = dyn.unsqueeze(0)
    dyn = dyn.contiguous()
    w = None if gamma is None else gamma.detach().to(xn.dtype)
    if activation is not None:
        assert saved.pre is not None  # kept by the forward pass whenever a gradient can be asked for
        dyn = _ACTIVATION_GRAD_OUT[activation](dyn, saved.pre, torch.empty_like(saved.pre))
    mask = [needs[0], needs[1] and gamma is not None, needs[2] and beta is not None]
    dx, dgamma, dbeta = torch.ops.aten.native_group_norm_backward(
        dyn, xn, saved.mean, saved.rstd, w, n, c, hxw, plan.groups, mask
    )
    if dx is not None:
        if saved.unsqueezed:
            dx = dx.squeeze(0)
        dx = dx.permute(saved.inverse)
    if dgamma is not None and gamma is not None:
        dgamma = dgamma.to(gamma.dtype)
    if dbeta is not None and beta is not None:
        dbeta = dbeta.to(beta.dtype)
    return (dx if mask[0] else None), (dgamma if mask[1] else None), (dbeta if mask[2] else None)


#: torch's activations, written into a given tensor: (input, out) -> out.
_ACTIVATION_OUT: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "relu": lambda pre, out: torch.clamp_min(pre, 0, out=out),
    "silu": lambda pre, out: torch.ops.aten.silu.out(pre, out=out),
    "gelu": lambda pre, out: torch.ops.aten.gelu.out(pre, out=out),
}

#: torch's fused activation gradients into a given tensor: (gradient of the output, input, out) -> out.
_ACTIVATION_GRAD_OUT: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "relu": lambda dy, pre, out: torch.ops.aten.threshold_backward.grad_input(dy, pre, 0, grad_input=out),
    "silu": lambda dy, pre, out: torch.ops.aten.silu_backward.grad_input(dy, pre, grad_input=out),
    "gelu": lambda dy, pre, out: torch.ops.aten.gelu_backward.grad_input(dy, pre, grad_input=out),
}


class _GroupNormFunction(torch.autograd.Function):
    """groupnorm's compiled kernel where it applies, else torch's own where it is exact, else the blocked
    passes; higher-order gradients go through :func:`composite`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        gamma: torch.Tensor | None,
        beta: torch.Tensor | None,
        plan: Plan,
        activation: str | None,
        grad_wanted: bool,
    ) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            found: tuple[torch.Tensor, _Native | _Kernel] | None
            found = _kernel_forward(plan, x, gamma, beta, activation, grad_wanted)
            if found is None and NATIVE:
                found = _native_forward(plan, x, gamma, beta, activation, grad_wanted)
            if found is None:
                out, ctx.stats = blocked_forward(plan, x, gamma, beta, activation)
                if _overflowed(ctx.stats, x):
                    out, ctx.stats = blocked_forward(plan, x, gamma, beta, activation, work=torch.float64)
            else:
                out, ctx.stats = found
        ctx.plan, ctx.activation = plan, activation
        ctx.save_for_backward(x, gamma, beta)
        return out

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, gamma, beta = ctx.saved_tensors
        needs = tuple(bool(n) for n in ctx.needs_input_grad[:3])
        if torch.is_grad_enabled():
            # create_graph: differentiate the composite, whose own graph autograd can differentiate again.
            wanted = [t for t, need in zip((x, gamma, beta), needs, strict=True) if need]
            with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
                y = composite(ctx.plan, x, gamma, beta, ctx.activation)
                found = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
            grads = [next(found) if need else None for need in needs]
            return (*grads, None, None, None)
        with torch.autocast(x.device.type, enabled=False):
            if isinstance(ctx.stats, _Native):
                dx, dgamma, dbeta = _native_backward(ctx.plan, gamma, beta, ctx.activation, ctx.stats, dy, needs)  # type: ignore[arg-type]
            elif isinstance(ctx.stats, _Kernel):
                dx, dgamma, dbeta = _kernel_backward(ctx.plan, x, gamma, beta, ctx.activation, ctx.stats, dy, needs)  # type: ignore[arg-type]
            else:
                dx, dgamma, dbeta = blocked_backward(
                    ctx.plan,
                    x,
                    gamma,
                    beta,
                    ctx.activation,
                    ctx.stats,
                    dy,
                    needs,  # type: ignore[arg-type]
                )
        return dx, dgamma, dbeta, None, None, None


def _overflowed(saved: _Saved, x: torch.Tensor) -> bool:
    """Whether a float32 variance overflowed (rstd 0) on finite input: float32 data beyond about 1e19."""
    return saved.rstd.dtype != torch.float64 and not bool((saved.rstd > 0).all()) and bool(torch.isfinite(x).all())


def _tracing() -> bool:
    jit: Any = torch.jit
    return bool(torch.compiler.is_compiling() or jit.is_tracing() or jit.is_scripting())


def _as_param(p: Any, x: torch.Tensor) -> torch.Tensor | None:
    if p is None or isinstance(p, torch.Tensor):
        return p
    return torch.as_tensor(p, device=x.device)


def execute(plan: Plan, x: torch.Tensor, gamma: Any, beta: Any, activation: Activation) -> torch.Tensor:
    """Run a validated plan on a tensor; ``gamma``/``beta`` are ``[C]`` tensors (or array-likes) or None."""
    g, b = _as_param(gamma, x), _as_param(beta, x)
    fused = activation if isinstance(activation, str) else None
    if _tracing() or x.numel() == 0 or type(x) is not torch.Tensor:
        y = composite(plan, x, g, b, fused)
    else:
        grad_wanted = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, g, b))
        y = _GroupNormFunction.apply(x, g, b, plan, fused, grad_wanted)  # type: ignore[no-untyped-call]
    return activation(y) if callable(activation) else y  # type: ignore[no-any-return]
