"""PyTorch backend: executes a plan on ``torch.Tensor`` inputs, with a hand-written backward pass.

Numerics follow the NumPy reference: in the default mode each group is shifted by a rough mean ``K``
(the mean of a small corner of the group, so ``x - K`` is exact for values near the mean), the mean and
variance of ``x - K`` are accumulated in float32 (float64 for float64 input), and the output is formed
as ``(x - K) * scale + offset``. ``mean_close_to_zero=True`` skips the shift.

Speed on CPU comes from working in the input's memory order (a channels-last tensor is processed as the
NHWC array it is, and the output keeps its layout) and in blocks of whole groups small enough to stay in
cache: each block is read from memory once, shifted into the output buffer, reduced, and scaled in place,
so the input crosses the memory bus once and the output once. The backward pass works the same way. Under
``torch.compile``, ``torch.export`` and for higher-order gradients a composite of differentiable
``torch`` operations with the same numerics runs instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from groupnorm._plan import Activation, Plan

NAME = "torch"

__all__ = ["execute", "is_array"]

#: elements per block of the blocked CPU path: a block and its float32 scratch stay in the caches.
BLOCK_ELEMENTS = 1 << 17

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


def _rough_shift(z: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Mean of the leading corner of every group (keepdim), detached: a value near the group's mean."""
    corner = z
    for d in dims:
        corner = corner.narrow(d, 0, min(_SHIFT_SAMPLE, int(z.shape[d])))
    return corner.mean(dim=tuple(dims), keepdim=True).detach()


def composite(
    plan: Plan, x: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None, activation: str | None
) -> torch.Tensor:
    """The plan as differentiable ``torch`` operations (any layout; what tracing and autograd see)."""
    work = _work_dtype(x.dtype)
    xs = x.reshape(plan.split_shape(x.shape)).to(work)
    dims = plan.split_reduce_axes
    z = xs if plan.mean_close_to_zero else xs - _rough_shift(xs, dims)
    var, mean = torch.var_mean(z, dim=dims, correction=0, keepdim=True)
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
# the blocked path: the input in memory order, viewed as (kept, group, channel, reduced) runs

_KEPT, _GROUP, _CHANNEL, _REDUCED = "k", "g", "c", "r"


@dataclass(frozen=True)
class _Layout:
    """How the blocked path views an input permuted into memory order."""

    perm: tuple[int, ...]
    """``x.permute(perm)`` is in memory order."""
    inverse: tuple[int, ...]
    channels_axis: int
    """The channel axis after the permutation."""
    runs: tuple[tuple[int, int], ...]
    """Runs of like axes of the permuted split view, merged into one axis of the compute view."""
    classes: tuple[str, ...]
    """Per compute-view axis: kept, group, channel (within a group) or reduced."""
    groups: int
    group_channels: int

    @property
    def reduce_dims(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.classes) if c in (_CHANNEL, _REDUCED))

    @property
    def channel_dim(self) -> int:
        return self.classes.index(_CHANNEL)

    @property
    def param_shape(self) -> tuple[int, ...]:
        sizes = {_GROUP: self.groups, _CHANNEL: self.group_channels}
        return tuple(sizes.get(c, 1) for c in self.classes)

    def view_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        c = self.channels_axis
        split = (*shape[:c], self.groups, self.group_channels, *shape[c + 1 :])
        return tuple(math.prod(split[a:b]) for a, b in self.runs)

    def stats_shape(self, view: Sequence[int]) -> tuple[int, ...]:
        return tuple(1 if c in (_CHANNEL, _REDUCED) else d for d, c in zip(view, self.classes, strict=True))

    def coef_shape(self, view: Sequence[int]) -> tuple[int, ...]:
        return tuple(1 if c == _REDUCED else d for d, c in zip(view, self.classes, strict=True))


@lru_cache(maxsize=512)
def _layout(plan: Plan, perm: tuple[int, ...]) -> _Layout:
    c = perm.index(plan.channels_axis)
    reduced = set(plan.reduction_axes)
    split_classes = [_REDUCED if p in reduced else _KEPT for p in perm[:c]]
    split_classes += [_GROUP, _CHANNEL]
    split_classes += [_REDUCED if p in reduced else _KEPT for p in perm[c + 1 :]]
    runs: list[tuple[int, int]] = []
    classes: list[str] = []
    for i, cls in enumerate(split_classes):
        if classes and classes[-1] == cls and cls in (_KEPT, _REDUCED):
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
            classes.append(cls)
    inverse = tuple(sorted(range(len(perm)), key=perm.__getitem__))
    return _Layout(perm, inverse, c, tuple(runs), tuple(classes), plan.groups, plan.group_channels)


def _memory_order(x: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor]:
    """A permutation putting ``x``'s axes in memory order, and ``x`` permuted (contiguous)."""
    strides = x.stride()
    perm = tuple(sorted(range(x.dim()), key=lambda a: (-strides[a] if x.shape[a] != 1 else 0, a)))
    if x.shape and all(x.shape[a] == 1 for a in range(x.dim())):
        perm = tuple(range(x.dim()))
    xp = x.permute(perm)
    if not xp.is_contiguous():
        perm = tuple(range(x.dim()))
        xp = x.contiguous()
    return perm, xp


def _blocks(view: Sequence[int], classes: Sequence[str], budget: int) -> Iterator[tuple[slice, ...]]:
    """Slices of the leading kept/group axes of the compute view, each block about ``budget`` elements."""
    total = math.prod(view)
    if total <= budget or classes[0] not in (_KEPT, _GROUP):
        yield (slice(None),)
        return
    inner0 = total // view[0]
    if inner0 > budget and len(view) > 1 and classes[1] == _GROUP:
        inner1 = inner0 // view[1]
        step = max(1, budget // inner1)
        for i in range(view[0]):
            for j in range(0, view[1], step):
                yield (slice(i, i + 1), slice(j, j + step))
        return
    step = max(1, budget // max(inner0, 1))
    for i in range(0, view[0], step):
        yield (slice(i, i + step),)


def _param_slices(block: tuple[slice, ...], classes: Sequence[str]) -> tuple[slice, ...]:
    return tuple(s if c == _GROUP else slice(None) for s, c in zip(block, classes, strict=False))


@dataclass
class _Saved:
    layout: _Layout
    shift: torch.Tensor | None
    mean: torch.Tensor
    rstd: torch.Tensor


def _params(
    layout: _Layout, gamma: torch.Tensor | None, beta: torch.Tensor | None, work: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    g = None if gamma is None else gamma.detach().to(work).reshape(layout.param_shape)
    b = None if beta is None else beta.detach().to(work).reshape(layout.param_shape)
    return g, b


def blocked_forward(
    plan: Plan,
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    activation: str | None,
    budget: int | None = None,
) -> tuple[torch.Tensor, _Saved]:
    """Forward pass in memory order and in cache-sized blocks of whole groups (no autograd)."""
    perm, xp = _memory_order(x)
    layout = _layout(plan, perm)
    view = layout.view_shape(xp.shape)
    xv = xp.view(view)
    out = torch.empty(xp.shape, dtype=x.dtype, device=x.device)
    ov = out.view(view)
    work = _work_dtype(x.dtype)
    same = work == x.dtype
    dims = layout.reduce_dims
    stats = layout.stats_shape(view)
    shift = None if plan.mean_close_to_zero else _rough_shift(xv, dims).to(work)
    mean = torch.empty(stats, dtype=work, device=x.device)
    rstd = torch.empty(stats, dtype=work, device=x.device)
    g, b = _params(layout, gamma, beta, work)
    if budget is None:
        budget = BLOCK_ELEMENTS if x.device.type == "cpu" else math.prod(view)
    for block in _blocks(view, layout.classes, budget):
        pblock = _param_slices(block, layout.classes)
        xc, oc = xv[block], ov[block]
        if shift is None:
            z = xc if same else xc.to(work)
        elif same:
            z = torch.sub(xc, shift[block], out=oc)
        else:
            z = torch.sub(xc, shift[block])  # promotes to the work dtype
        var, m = torch.var_mean(z, dim=dims, correction=0, keepdim=True)
        r = var.add_(plan.epsilon).rsqrt_()
        scale = r if g is None else r * g[pblock]
        offset = -m * scale if b is None else torch.addcmul(b[pblock], m, scale, value=-1)
        if same:
            y = torch.addcmul(offset, z, scale, out=oc)
        elif shift is None:
            y = torch.addcmul(offset, z, scale)
        else:
            y = torch.addcmul(offset, z, scale, out=z)
        if activation is not None:
            _activate_(y, activation)
        if not same:
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
    view = layout.view_shape(xp.shape)
    xv, dyv = xp.view(view), dyp.view(view)
    work = _work_dtype(x.dtype)
    dims = layout.reduce_dims
    cdim = layout.channel_dim
    n = plan.group_size
    g, b = _params(layout, gamma, beta, work)
    dx = torch.empty(xp.shape, dtype=x.dtype, device=x.device) if needs[0] else None
    dxv = None if dx is None else dx.view(view)
    coef = layout.coef_shape(view)
    sum_d = torch.empty(coef, dtype=work, device=x.device) if (needs[2] or needs[1]) else None
    sum_dxhat = torch.empty(coef, dtype=work, device=x.device) if needs[1] else None
    shift, mean, rstd = saved.shift, saved.mean, saved.rstd
    if budget is None:
        budget = BLOCK_ELEMENTS if x.device.type == "cpu" else math.prod(view)
    for block in _blocks(view, layout.classes, budget):
        pblock = _param_slices(block, layout.classes)
        xc, dyc = xv[block], dyv[block]
        m, r = mean[block], rstd[block]
        gc = None if g is None else g[pblock]
        # z = x - K, promoted to the work dtype
        z = (xc if xc.dtype == work else xc.to(work)) if shift is None else torch.sub(xc, shift[block])
        d = dyc if dyc.dtype == work else dyc.to(work)
        if activation is not None:
            scale = r if gc is None else r * gc
            offset = -m * scale if b is None else torch.addcmul(b[pblock], m, scale, value=-1)
            pre = torch.addcmul(offset, z, scale)
            d = d * _activation_grad(pre, activation)
        # the sum over every reduced axis except the channel one, per channel:
        red_only = tuple(i for i in dims if i != cdim)
        a = d.sum(dim=red_only, keepdim=True) if red_only else d
        dz = (d * z).sum(dim=red_only, keepdim=True) if red_only else d * z
        dxhat = (dz - m * a) * r  # per channel: sum of d * xhat
        if sum_d is not None:
            sum_d[block] = a
        if sum_dxhat is not None:
            sum_dxhat[block] = dxhat
        if dxv is not None:
            ga = a if gc is None else a * gc
            gx = dxhat if gc is None else dxhat * gc
            mg = ga.sum(dim=cdim, keepdim=True) / n
            mgx = gx.sum(dim=cdim, keepdim=True) / n
            coef_a = r if gc is None else r * gc
            coef_b = -r * r * mgx
            coef_c = r * (r * m * mgx - mg)
            t = torch.addcmul(coef_c, z, coef_b)
            t.addcmul_(d, coef_a)
            dxv[block] = t
    kept = tuple(i for i, c in enumerate(layout.classes) if c == _KEPT)
    dgamma = dbeta = None
    if needs[1] and sum_dxhat is not None and gamma is not None:
        dgamma = (sum_dxhat.sum(dim=kept) if kept else sum_dxhat).reshape(-1).to(gamma.dtype)
    if needs[2] and sum_d is not None and beta is not None:
        dbeta = (sum_d.sum(dim=kept) if kept else sum_d).reshape(-1).to(beta.dtype)
    return (None if dx is None else dx.permute(layout.inverse)), dgamma, dbeta


# --------------------------------------------------------------------------------------------------
# autograd and dispatch


class _GroupNormFunction(torch.autograd.Function):
    """The blocked forward and backward passes; higher-order gradients go through :func:`composite`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        gamma: torch.Tensor | None,
        beta: torch.Tensor | None,
        plan: Plan,
        activation: str | None,
    ) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            out, saved = blocked_forward(plan, x, gamma, beta, activation)
        ctx.plan, ctx.activation, ctx.stats = plan, activation, saved
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
            return (*grads, None, None)
        with torch.autocast(x.device.type, enabled=False):
            dx, dgamma, dbeta = blocked_backward(ctx.plan, x, gamma, beta, ctx.activation, ctx.stats, dy, needs)  # type: ignore[arg-type]
        return dx, dgamma, dbeta, None, None


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
        y = _GroupNormFunction.apply(x, g, b, plan, fused)  # type: ignore[no-untyped-call]
    return activation(y) if callable(activation) else y  # type: ignore[no-any-return]
