"""groupnorm's numerics (:mod:`groupnorm._numerics`) as plain ``torch`` operations: the exact fallback of
every path, and what tracers see.

Every implementation of the operator (the compiled CPU kernel, the Triton kernels, this module) keeps the
same statistics per (kept index, group), as float32 tensors of shape ``(K, G)`` (float64 for float64 input):

- ``shift``: the group's shift in the input's units, ``K / u`` (steps 1 and 3 of the numerics: the
  corner's mean, or the rescue's centre for a group whose values are too large or too small to square).
  Zero with ``mean_close_to_zero`` (plain sums, as TensorFlow 1.15 did) unless the group is rescued.
- ``mean``: the mean of ``x - shift`` over the group (the numerics' ``mean / u``).
- ``rstd``: the reciprocal standard deviation in the input's units, the numerics' ``r`` (step 4).

The output is ``(x - shift - mean) * rstd * gamma + beta``, then the activation: step 5 with the unit
``u`` (an exact power of two) folded into the three statistics, so that they mean the same on every
kernel. The statistics come from :func:`groupnorm._numerics.statistics` with this module's reductions
(:class:`_Passes`) and array functions (:class:`_Ops`); its rescue is a Python ``if`` in eager mode and,
where a tracer or a transform sees the call, computed for every call and selected per group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from groupnorm import _numerics as N
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
SHIFT_SPAN = N.CORNER


class _Ops:
    """:class:`groupnorm._numerics.Ops` in ``torch``."""

    def where(self, condition: Any, a: Any, b: Any) -> Any:
        return torch.where(condition, a, b)

    def maximum(self, a: Any, b: Any) -> Any:
        if isinstance(b, (int, float)):
            return torch.clamp(a, min=b)
        return torch.maximum(a, b)

    def rsqrt(self, a: Any) -> Any:
        return torch.rsqrt(a)

    def exp(self, a: Any) -> Any:
        return torch.exp(a)

    def erf(self, a: Any) -> Any:
        return torch.erf(a)

    def exponent(self, a: Any) -> Any:
        # frexp's exponent from log2 (which every exporter has), corrected where log2 rounds across a
        # power of two; an integer-valued float tensor (infinite or NaN where ``a`` is 0, Inf or NaN: the
        # rescue's clamp and its per-group select take care of those)
        e = torch.floor(torch.log2(a)) + 1
        e = torch.where(torch.pow(2.0, e - 1) > a, e - 1, e)
        return torch.where(torch.pow(2.0, e) <= a, e + 1, e)

    def power_of_two(self, e: Any) -> Any:
        return torch.pow(2.0, e)

    def all(self, flags: Any) -> Any:
        return flags.all()

    def cond(self, predicate: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
        if _can_branch(predicate):
            return true_fn() if bool(predicate) else false_fn()
        # ``false_fn`` (the rescue) selects the ordinary statistics for every group that passes its
        # checks: the same result, as operations a graph can hold
        return false_fn()


def _can_branch(predicate: torch.Tensor) -> bool:
    """Whether a Python branch on ``predicate``'s value is an ordinary eager branch: a plain tensor of
    real data, seen by no tracer, compiler or ``torch.func`` transform."""
    return (
        type(predicate) is torch.Tensor
        and predicate.device.type != "meta"
        and not _jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(predicate)
    )


_OPS = _Ops()
_jit: Any = torch.jit  # (its tracing predicates are not exported for type checkers)


#: the fusable activations: torch's own kernels, each the function :func:`groupnorm._numerics.activate`
#: states (the tests check that they agree)
ACTIVATION: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": torch.relu, "silu": F.silu, "gelu": F.gelu}


#: each activation's derivative at the pre-activation value (:func:`groupnorm._numerics.activation_grad`)
def _derivative(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def grad(pre: torch.Tensor) -> torch.Tensor:
        return N.activation_grad(name, pre, _OPS)  # type: ignore[no-any-return]

    return grad


ACTIVATION_GRAD: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    name: _derivative(name) for name in ("relu", "silu", "gelu")
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


class _Passes:
    """:class:`groupnorm._numerics.Passes` over ``x`` as rows ``(K, G, C // G, R)`` in the work dtype;
    per-group values are ``(K, G)``. The shift and the unit are constants to autograd (the result does
    not depend on them), the sums are differentiable."""

    def __init__(self, xr: torch.Tensor) -> None:
        self.xr = xr

    def _scaled(self, unit: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
        z = self.xr if unit is None else self.xr * unit.detach()[..., None, None]
        return z if shift is None else z - shift.detach()[..., None, None]

    def corner_shift(self, unit: torch.Tensor | None) -> torch.Tensor:
        box = self.xr.detach()[..., :SHIFT_SPAN]  # (its sizes: traced ones under jit.trace, symbolic ones
        # under torch.compile, so that a graph holds for every size)
        first = box[:, :, :1, :1]
        if unit is not None:
            u = unit.detach()[..., None, None]
            box, first = box * u, first * u
        total = (box - first).sum(dim=(2, 3))
        return N.shift_from_corner(first[:, :, 0, 0], total, box.shape[2] * box.shape[3])  # type: ignore[no-any-return]

    def sums(self, shift: torch.Tensor | None, unit: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        z = self._scaled(unit, shift)
        if unit is None and (z.requires_grad or _jit.is_tracing()):  # (a trace holds one graph)
            # A rescued group selects this pass's statistics away, and autograd hands them a zero
            # gradient; a deviation beyond float32 (values near its largest of opposite signs) would turn
            # it into 0 * inf = NaN. The largest finite number keeps the square out of range (the group is
            # rescued all the same) and passes no gradient (NaN stays NaN).
            big = torch.finfo(z.dtype).max
            z = torch.nan_to_num(z, nan=math.nan, posinf=big, neginf=-big)
        s1 = z.sum(dim=(2, 3))
        # an overflowed s1 is flagged by its s2 (also out of range) whatever its value: zero keeps its
        # gradient free of 0 * inf too
        return torch.where(torch.isfinite(s1), s1, 0.0), (z * z).sum(dim=(2, 3))

    def centre(self, shift: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        return self._scaled(unit, shift).sum(dim=(2, 3)).detach()

    def max_abs(self) -> torch.Tensor:
        return self.xr.detach().abs().amax(dim=(2, 3))


def _in_units(plan: Plan, x: torch.Tensor) -> tuple[torch.Tensor, N.Stats, torch.Tensor, torch.Tensor]:
    """``x`` as rows in the work dtype, its :class:`groupnorm._numerics.Stats` (shift and unit constant
    to autograd) and step 4's ``(rstd_u, r)``, each per group ``(K, G)``."""
    work = work_dtype(x.dtype)
    xr = rows(plan, x).to(work)
    k, g = xr.shape[0], xr.shape[1]
    if plan.group_size == 0:  # (the plan's sizes: a Python branch without a guard)
        zeros = torch.zeros(k, g, dtype=work, device=x.device)
        rstd = torch.full_like(zeros, 1 / math.sqrt(plan.epsilon) if plan.epsilon else math.inf)
        return xr, N.Stats(zeros, zeros + 1, zeros, zeros), rstd, rstd
    lim = N.limits("float64" if work == torch.float64 else "float32")
    n = xr.shape[2] * xr.shape[3]  # (plan.group_size, as the tracers see it)
    st = N.statistics(_Passes(xr), n, plan.epsilon, not plan.mean_close_to_zero, lim, _OPS)
    st = N.Stats(st.shift.detach(), st.unit.detach(), st.mean, st.var)
    rstd_u, r = N.normalizer(st, plan.epsilon, lim, _OPS)
    return xr, st, rstd_u, r


def statistics(plan: Plan, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(shift, mean, rstd)`` of every (kept index, group), each ``(K, G)`` in the work dtype (see the
    module docstring)."""
    _, st, _, r = _in_units(plan, x)
    return st.shift / st.unit, st.mean / st.unit, r


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
    """The whole computation as differentiable ``torch`` operations (any transform can see through it):
    step 5 of the numerics in the rescue's units, ``act((x * u - K) * scale + offset)``, so that every
    intermediate value and every gradient autograd forms stays in range."""
    xr, st, rstd_u, _ = _in_units(plan, x)
    unit = st.unit
    if not (_can_branch(unit) and bool((unit == 1).all())):  # (where no group is rescued: x itself)
        xr = xr * unit[..., None, None]
    work = xr.dtype
    scale = rstd_u[..., None, None]
    w, b = _params(plan, weight, work), _params(plan, bias, work)
    if w is not None:
        scale = scale * w
    offset = -st.mean[..., None, None] * scale
    if b is not None:
        offset = offset + b
    pre = (xr - st.shift[..., None, None]) * scale + offset
    y = pre if activation is None else ACTIVATION[activation](pre)
    return _from_rows(plan, y, x.shape).to(x.dtype)


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
