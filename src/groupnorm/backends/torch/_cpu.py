"""The compiled CPU kernel (``_cpu_kernel.c``) for float32 tensors, called through :mod:`ctypes`.

The kernel sees a tensor in memory order as ``(K, A, C, B)``: ``K`` kept rows, ``A`` reduced positions
outside the channels, ``C`` channels, ``B`` reduced positions inside them. NCHW is ``(N, 1, C, H*W)``,
channels-last and NHWC are ``(N, H*W, C, 1)``. Layouts that are not of this form (a kept axis between
reduced ones, say) return None here, and the operator runs the composite instead.
"""

from __future__ import annotations

import os
import threading
from functools import lru_cache
from typing import Any

import torch

from groupnorm import _numerics as N
from groupnorm._plan import Plan
from groupnorm.backends.torch import _build, _composite

__all__ = ["backward", "forward", "geometry"]

#: whether the kernel may ask Linux to back its large outputs with transparent huge pages (one page fault
#: per 2 MiB instead of per 4 KiB when the output is first written; ``GROUPNORM_HUGE_PAGES=0`` turns it off).
HUGE_PAGES = os.environ.get("GROUPNORM_HUGE_PAGES", "1") != "0"


@lru_cache(maxsize=1024)
def _geometry(plan: Plan, shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    order = sorted(range(len(shape)), key=lambda a: (-strides[a], a))
    # axes of size 1 move no memory; the rest must be dense in that order
    expected = 1
    for a in reversed(order):
        if shape[a] != 1 and strides[a] != expected:
            return None
        expected *= shape[a] if shape[a] != 1 else 1
    reduced = set(plan.reduction_axes)
    runs: list[list[Any]] = []
    for a in order:
        if shape[a] == 1 and a != plan.channels_axis:
            continue
        cls = "c" if a == plan.channels_axis else "r" if a in reduced else "k"
        if runs and runs[-1][0] == cls:
            runs[-1][1] *= shape[a]
        else:
            runs.append([cls, shape[a]])
    k = runs.pop(0)[1] if runs and runs[0][0] == "k" else 1
    a_ = runs.pop(0)[1] if runs and runs[0][0] == "r" else 1
    if not runs or runs[0][0] != "c" or [cls for cls, _ in runs[1:]] not in ([], ["r"]):
        return None
    return k, a_, runs[0][1], runs[1][1] if len(runs) > 1 else 1


#: half-precision inputs are widened to float32 exactly, in rows of at most this many elements, in scratch
#: buffers kept per thread between calls (so that a call allocates its output alone)
WIDEN_ELEMENTS = 1 << 22

_HALF = (torch.float16, torch.bfloat16)
_SCRATCH = threading.local()


#: the kernel sums float32 squares, which underflow below ``2**-126``: where ``var + epsilon`` could fall
#: below the numerics' ``TINY`` (``epsilon`` below it, step 3 of :mod:`groupnorm._numerics`) the group needs
#: the rescue, which the composite runs; above it, a variance lost to underflow changes nothing
MIN_EPSILON = N.limits("float32").tiny


def geometry(plan: Plan, x: torch.Tensor) -> tuple[int, int, int, int] | None:
    """``x``'s ``(K, A, C, B)`` where the kernel can run it: float32 (or half precision, widened), on the
    CPU, a fitting layout, and an epsilon the kernel's float32 squares resolve (see :data:`MIN_EPSILON`)."""
    if x.dtype not in (torch.float32, *_HALF) or x.device.type != "cpu" or x.numel() == 0:
        return None
    if not plan.epsilon >= MIN_EPSILON:
        return None
    return _geometry(plan, tuple(x.shape), tuple(x.stride()))


def _scratch(slot: int, size: int) -> torch.Tensor:
    """A float32 buffer of ``size`` elements: kept per thread up to :data:`WIDEN_ELEMENTS`, else new."""
    if size > WIDEN_ELEMENTS:
        return torch.empty(size)
    buffers: dict[int, torch.Tensor] = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get(slot)
    if buf is None or buf.numel() < size:
        buf = buffers[slot] = torch.empty(size)
    return buf[:size]


def _row_chunks(geo: tuple[int, int, int, int]) -> list[tuple[int, int]]:
    """Ranges of kept rows, each of at most :data:`WIDEN_ELEMENTS` elements where a row allows."""
    k, a, c, b = geo
    per_row = a * c * b
    step = max(1, WIDEN_ELEMENTS // per_row)
    return [(k0, min(k, k0 + step)) for k0 in range(0, k, step)]


def _fresh(lib: Any, like: torch.Tensor) -> torch.Tensor:
    """A new tensor with ``like``'s strides, backed by huge pages where :data:`HUGE_PAGES` allows."""
    t = torch.empty_like(like)
    if HUGE_PAGES:
        lib.groupnorm_prefer_huge_pages(t.data_ptr(), t.numel() * 4)
    return t


def _param(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None else p.detach().to(torch.float32).contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def forward(
    plan: Plan,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    activation: str | None,
    keep_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(out, pre, shift, mean, rstd)``, or None where the kernel does not apply. ``out`` has ``x``'s
    strides; ``pre`` (the output before the activation) is empty unless ``keep_pre`` and an activation."""
    geo = geometry(plan, x)
    lib = None if geo is None else _build.load()
    if lib is None or geo is None:
        return None
    k = geo[0]
    w, bb = _param(weight), _param(bias)
    shift, mean, rstd = (torch.empty(k, plan.groups) for _ in range(3))
    if x.dtype in _HALF:
        return _half_forward(plan, lib, x, geo, w, bb, activation, keep_pre, shift, mean, rstd)
    out = _fresh(lib, x)
    _run_forward(plan, lib, x, out, geo, w, bb, shift, mean, rstd)
    pre = out.new_empty(0)
    if activation is not None:
        if keep_pre:
            pre, out = out, _ACTIVATION_OUT[activation](out, _fresh(lib, out))
        else:
            _ACTIVATION_OUT[activation](out, out)
    return out, pre, shift, mean, rstd


def _threads(numel: int) -> int:
    """One thread below the size where starting a parallel region costs more than it saves."""
    return 1 if numel < (1 << 16) else torch.get_num_threads()


def _run_forward(
    plan: Plan,
    lib: Any,
    x: torch.Tensor,
    out: torch.Tensor,
    geo: tuple[int, int, int, int],
    w: torch.Tensor | None,
    bb: torch.Tensor | None,
    shift: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> None:
    k, a, c, b = geo
    status = lib.groupnorm_forward_f32(
        x.data_ptr(), out.data_ptr(), k, a, c, b, plan.groups, _ptr(w), _ptr(bb), plan.epsilon,
        int(not plan.mean_close_to_zero), shift.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
        _threads(x.numel()),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("groupnorm: out of memory for the CPU kernel's statistics")


def _half_forward(
    plan: Plan,
    lib: Any,
    x: torch.Tensor,
    geo: tuple[int, int, int, int],
    w: torch.Tensor | None,
    bb: torch.Tensor | None,
    activation: str | None,
    keep_pre: bool,
    shift: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float16/bfloat16 input, widened to float32 (exactly) row by row; the output rounded once."""
    out = torch.empty_like(x)
    pre = torch.empty_like(x) if keep_pre and activation is not None else x.new_empty(0)
    _, a, c, b = geo
    per_row = a * c * b
    flat_x, flat_out, flat_pre = _flat(x), _flat(out), _flat(pre) if pre.numel() else None
    for k0, k1 in _row_chunks(geo):
        span = slice(k0 * per_row, k1 * per_row)
        xs = _scratch(0, (k1 - k0) * per_row).copy_(flat_x[span])
        ys = _scratch(1, xs.numel())
        _run_forward(plan, lib, xs, ys, (k1 - k0, a, c, b), w, bb, shift[k0:k1], mean[k0:k1], rstd[k0:k1])
        if activation is not None:
            if flat_pre is not None:
                flat_pre[span].copy_(ys)
            _ACTIVATION_OUT[activation](ys, ys)
        flat_out[span].copy_(ys)
    return out, pre, shift, mean, rstd


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements in memory order (a view)."""
    return t.as_strided((t.numel(),), (1,))


def backward(
    plan: Plan,
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    pre: torch.Tensor,
    shift: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    activation: str | None,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None:
    """The gradients, or None where the kernel does not apply (then neither did it in the forward pass)."""
    geo = geometry(plan, x) if x.dtype == torch.float32 else None  # (half precision: the composite)
    lib = None if geo is None else _build.load()
    if lib is None or geo is None:
        return None
    k, a, c, b = geo
    if dy.stride() != x.stride() or dy.dtype != torch.float32:
        dy = torch.empty_like(x).copy_(dy)  # the kernel reads dy in x's memory order
    if activation is not None:
        if pre.numel() == 0:  # not kept: recomputed from the statistics
            pre = _composite.apply(plan, x, weight, bias, shift, mean, rstd, None)[0]
        dy = _ACTIVATION_GRAD_OUT[activation](dy, pre, _fresh(lib, x))
    w = _param(weight)
    dx = _fresh(lib, x) if needs[0] else None
    dweight = torch.empty(c) if needs[1] and weight is not None else None
    dbias = torch.empty(c) if needs[2] and bias is not None else None
    status = lib.groupnorm_backward_f32(
        x.data_ptr(), dy.data_ptr(), _ptr(dx), k, a, c, b, plan.groups, _ptr(w),
        shift.contiguous().data_ptr(), mean.contiguous().data_ptr(), rstd.contiguous().data_ptr(),
        _ptr(dweight), _ptr(dbias), _threads(x.numel()),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("groupnorm: out of memory for the CPU kernel's statistics")
    return (
        dx,
        None if dweight is None or weight is None else dweight.to(weight.dtype),
        None if dbias is None or bias is None else dbias.to(bias.dtype),
    )


#: torch's activations written into a given tensor: (input, out) -> out.
_ACTIVATION_OUT = {
    "relu": lambda pre, out: torch.clamp_min(pre, 0, out=out),
    "silu": lambda pre, out: torch.ops.aten.silu.out(pre, out=out),
    "gelu": lambda pre, out: torch.ops.aten.gelu.out(pre, out=out),
}

#: torch's fused activation gradients into a given tensor: (gradient of the output, input, out) -> out.
_ACTIVATION_GRAD_OUT = {
    "relu": lambda dy, pre, out: torch.ops.aten.threshold_backward.grad_input(dy, pre, 0, grad_input=out),
    "silu": lambda dy, pre, out: torch.ops.aten.silu_backward.grad_input(dy, pre, grad_input=out),
    "gelu": lambda dy, pre, out: torch.ops.aten.gelu_backward.grad_input(dy, pre, grad_input=out),
}
