"""groupnorm's numerics as plain ``torch`` operations: the exact fallback of every path, and what tracers see.

Every implementation of the operator (the compiled CPU kernel, the Triton kernels, this module) keeps the
same statistics per (kept index, group), as float32 tensors of shape ``(K, G)`` (float64 for float64 input):

- ``shift``: the group's shift, the mean over the group's channels of its first ``min(8, R)`` positions
  along the reduction axes flattened in row-major order (``R`` positions in all). Values near the group's
  mean, so ``x - shift`` is exact where it matters and the variance of ``x - shift`` does not cancel.
  Zero with ``mean_close_to_zero`` (plain sums, as TensorFlow 1.15 did).
- ``mean``: the mean of ``x - shift`` over the group.
- ``rstd``: ``1 / sqrt(var + eps)``, ``var`` the population variance, clamped at zero.

The output is ``(x - shift - mean) * rstd * gamma + beta``, then the activation. Float32 values too large
to square (beyond about 1e19) are rescued without a data-dependent branch: the sums run over ``x - shift``
scaled by a power of two chosen from the group's largest deviation, and ``rstd`` is formed from the scaled
variance, so neither the variance nor ``rstd * rstd`` is ever formed unscaled.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from groupnorm._plan import Plan

__all__ = [
    "ACTIVATION",
    "ACTIVATION_GRAD",
    "SHIFT_SPAN",
    "apply",
    "backward",
    "composite",
    "rows",
    "statistics",
    "work_dtype",
]

#: how many leading positions of the flattened reduction axes the shift averages, per channel of the group
SHIFT_SPAN = 8

#: the fusable activations
ACTIVATION: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": torch.relu, "silu": F.silu, "gelu": F.gelu}


def _silu_grad(pre: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(pre)
    return s * (1 + pre * (1 - s))


def _gelu_grad(pre: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1 + torch.erf(pre * (1 / math.sqrt(2))))
    return cdf + pre * torch.exp(-0.5 * pre * pre) * (1 / math.sqrt(2 * math.pi))


#: each activation's derivative at the pre-activation value
ACTIVATION_GRAD: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": lambda pre: (pre > 0).to(pre.dtype),
    "silu": _silu_grad,
    "gelu": _gelu_grad,
}


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in float32 at least."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows(plan: Plan, x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``(K, G, C // G, R)``: kept axes, groups, channels of a group, the flattened reduced axes
    (a view where the layout allows, else a copy)."""
    order = (*plan.kept_axes, plan.channels_axis, *plan.reduction_axes)
    # (sizes stay as the input gives them, symbolic under torch.compile: no int() guards on them)
    k = math.prod(x.shape[a] for a in plan.kept_axes)
    r = math.prod(x.shape[a] for a in plan.reduction_axes)
    return x.permute(order).reshape(k, plan.groups, plan.group_channels, r)


def _from_rows(plan: Plan, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`rows`: a ``(K, G, C // G, R)`` tensor back in the input's axis order."""
    order = (*plan.kept_axes, plan.channels_axis, *plan.reduction_axes)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return t.reshape([shape[a] for a in order]).permute(inverse)


def statistics(plan: Plan, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(shift, mean, rstd)`` of every (kept index, group), each ``(K, G)`` in the work dtype.

    Differentiable where ``x`` requires grad (the shift is a constant: the result does not depend on it).
    """
    work = work_dtype(x.dtype)
    xr = rows(plan, x).to(work)
    k, g = xr.shape[0], xr.shape[1]
    empty = plan.group_size == 0  # (the plan's sizes: a Python branch without a guard)
    if plan.mean_close_to_zero or empty:
        shift = torch.zeros(k, g, dtype=work, device=x.device)
    else:
        shift = xr[..., :SHIFT_SPAN].mean(dim=(2, 3)).detach()
        # a non-finite corner (an infinity there) gives no usable shift; zero keeps other values exact
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    z = xr - shift[..., None, None]
    if work == torch.float32 and x.dtype == torch.float32:
        # an exact power of two that brings the group's largest deviation to about 1 (never above 1, so
        # small values keep their epsilon): squares of the scaled values cannot overflow
        top = torch.zeros_like(shift) if empty else z.detach().abs().amax(dim=(2, 3))
        top = torch.where(torch.isfinite(top) & (top > 1), top, torch.ones_like(top))
        scale = torch.pow(2.0, -torch.floor(torch.log2(top)))  # (pow: every exporter has it)
    else:
        scale = torch.ones_like(shift)
    zs = z * scale[..., None, None]
    mean_s = zs.mean(dim=(2, 3))
    var_s = torch.clamp((zs * zs).mean(dim=(2, 3)) - mean_s * mean_s, min=0)
    # (clamped: where the scaled epsilon underflows and the group is constant, rstd stays finite)
    rstd = torch.rsqrt(torch.clamp(var_s + plan.epsilon * scale * scale, min=torch.finfo(work).tiny)) * scale
    return shift, mean_s / scale, rstd


def _params(plan: Plan, p: torch.Tensor | None, work: torch.dtype) -> torch.Tensor | None:
    return None if p is None else p.to(work).reshape(plan.groups, plan.group_channels, 1)


def apply(
    plan: Plan,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    shift: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    activation: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and the pre-activation output (the same tensor without an activation), in ``x``'s dtype
    and axis order, from the statistics."""
    work = shift.dtype
    xr = rows(plan, x).to(work)
    scale = rstd[..., None, None]
    w, b = _params(plan, weight, work), _params(plan, bias, work)
    if w is not None:
        scale = scale * w
    offset = -mean[..., None, None] * scale
    if b is not None:
        offset = offset + b
    pre = (xr - shift[..., None, None]) * scale + offset
    y = pre if activation is None else ACTIVATION[activation](pre)
    return _from_rows(plan, y, x.shape).to(x.dtype), _from_rows(plan, pre, x.shape).to(x.dtype)


def composite(
    plan: Plan, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, activation: str | None
) -> torch.Tensor:
    """The whole computation as differentiable ``torch`` operations (any transform can see through it)."""
    shift, mean, rstd = statistics(plan, x)
    return apply(plan, x, weight, bias, shift, mean, rstd, activation)[0]


def backward(
    plan: Plan,
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    shift: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    activation: str | None,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(y * dy)`` with respect to ``x``, ``weight`` and ``bias``, from the statistics:
    ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` over each group, ``g = gamma * dy'``, where
    ``dy'`` is ``dy`` through the activation's derivative."""
    work = shift.dtype
    xr = rows(plan, x).to(work)
    d = rows(plan, dy).to(work)
    xhat = (xr - shift[..., None, None] - mean[..., None, None]) * rstd[..., None, None]
    w = _params(plan, weight, work)
    if activation is not None:
        pre = xhat if w is None else xhat * w
        b = _params(plan, bias, work)
        if b is not None:
            pre = pre + b
        d = d * ACTIVATION_GRAD[activation](pre)
    dbias = d.sum(dim=(0, 3)).reshape(-1).to(bias.dtype) if needs[2] and bias is not None else None
    dweight = (d * xhat).sum(dim=(0, 3)).reshape(-1).to(weight.dtype) if needs[1] and weight is not None else None
    dx = None
    if needs[0]:
        g = d if w is None else d * w
        n = max(plan.group_size, 1)
        mg = g.sum(dim=(2, 3), keepdim=True) / n
        mgx = (g * xhat).sum(dim=(2, 3), keepdim=True) / n
        dxr = rstd[..., None, None] * (g - mg - xhat * mgx)
        dx = _from_rows(plan, dxr, x.shape).to(x.dtype)
    return dx, dweight, dbias
