"""Group normalization of a tensor sharded along a reduction axis across a ``torch.distributed`` group.

Each rank holds a slice of every group (domain parallelism: an image split by rows, a video by frames).
Each rank computes its slice's count, mean and sum of squared deviations (``M2``) with the shifted,
exact algorithm; the ranks exchange these and merge them with Chan et al.'s pairwise formula in float64,
which is stable however far apart the slices' means are. Each rank then normalizes its own slice, so its
output is its slice of the unsharded result. The backward pass all-reduces the two per-group sums the
input gradient needs, so each rank's input gradient is its slice of the unsharded gradient; gradients of
``weight`` and ``bias`` are each rank's share, and sum over the ranks to the unsharded gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from groupnorm._plan import Activation, Plan
from groupnorm.backends.torch._composite import ACTIVATION, ACTIVATION_GRAD, SHIFT_SPAN
from groupnorm.backends.torch._composite import work_dtype as _work_dtype

__all__ = ["sharded_group_norm"]


def _corner(z: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """This rank's leading corner of every group (a shift for its slice: any value near the mean will do)."""
    for d in dims:
        z = z.narrow(d, 0, min(SHIFT_SPAN, int(z.shape[d])))
    return z


def _merge(stats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan et al.'s pairwise merge of per-rank (count, mean, M2), in rank order (float64)."""
    count, mean, m2 = stats[0][0].clone(), stats[0][1].clone(), stats[0][2].clone()
    for other in stats[1:]:
        n_b, mean_b, m2_b = other[0], other[1], other[2]
        total = count + n_b
        delta = mean_b - mean
        weight = torch.where(total > 0, n_b / total.clamp(min=1), torch.zeros_like(total))
        mean = mean + delta * weight
        m2 = m2 + m2_b + delta * delta * count * weight
        count = total
    return count, mean, m2


class _ShardedGroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        gamma: torch.Tensor | None,
        beta: torch.Tensor | None,
        plan: Plan,
        activation: str | None,
        group: Any,
    ) -> torch.Tensor:
        work = _work_dtype(x.dtype)
        xs = x.detach().reshape(plan.split_shape(x.shape)).to(work)
        dims = plan.split_reduce_axes
        n_local = plan.group_size
        if n_local > 0:
            shift = _corner(xs, dims).mean(dim=dims, keepdim=True)
            z = xs - shift
            m = z.mean(dim=dims, keepdim=True)
            m2 = ((z - m) ** 2).sum(dim=dims, keepdim=True).double()
            local_mean = shift.double() + m.double()
        else:
            shift = torch.zeros(plan.stats_shape(x.shape), dtype=work, device=x.device)
            z = xs
            local_mean = m2 = torch.zeros(shift.shape, dtype=torch.float64, device=x.device)
        local = torch.stack([torch.full_like(local_mean, float(n_local)), local_mean, m2])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        count, mean, m2 = _merge(gathered)
        rstd = torch.rsqrt(m2 / count + plan.epsilon).to(work)
        centre = (mean - shift.double()).to(work)  # the global mean, relative to this rank's shift
        xhat = (z - centre) * rstd
        g = None if gamma is None else gamma.detach().to(work).reshape(plan.param_shape)
        b = None if beta is None else beta.detach().to(work).reshape(plan.param_shape)
        pre = xhat if g is None else xhat * g
        if b is not None:
            pre = pre + b
        y = pre if activation is None else ACTIVATION[activation](pre)
        ctx.save_for_backward(x, gamma, beta)
        ctx.plan, ctx.activation, ctx.group = plan, activation, group
        ctx.shift, ctx.centre, ctx.rstd, ctx.count = shift, centre, rstd, count.to(work)
        return y.reshape(x.shape).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable  # type: ignore[misc]
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, gamma, beta = ctx.saved_tensors
        plan: Plan = ctx.plan
        work = _work_dtype(x.dtype)
        split = plan.split_shape(x.shape)
        xhat = ((x.reshape(split).to(work) - ctx.shift) - ctx.centre) * ctx.rstd
        g = None if gamma is None else gamma.to(work).reshape(plan.param_shape)
        d = dy.reshape(split).to(work)
        if ctx.activation is not None:
            pre = xhat if g is None else xhat * g
            if beta is not None:
                pre = pre + beta.to(work).reshape(plan.param_shape)
            d = d * ACTIVATION_GRAD[ctx.activation](pre)
        channel_axes = (plan.channels_axis, plan.channels_axis + 1)
        others = tuple(a for a in range(len(split)) if a not in channel_axes)
        dbeta = None if beta is None else d.sum(dim=others).reshape(-1).to(beta.dtype)
        dgamma = None if gamma is None else (d * xhat).sum(dim=others).reshape(-1).to(gamma.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            gd = d if g is None else d * g
            dims = plan.split_reduce_axes
            sums = torch.stack([gd.sum(dim=dims, keepdim=True), (gd * xhat).sum(dim=dims, keepdim=True)])
            dist.all_reduce(sums, group=ctx.group)
            dx = ctx.rstd * (gd - sums[0] / ctx.count - xhat * (sums[1] / ctx.count))
            dx = dx.reshape(x.shape).to(x.dtype)
        return dx, dgamma, dbeta, None, None, None


def sharded_group_norm(
    plan: Plan, x: torch.Tensor, gamma: Any, beta: Any, activation: Activation, group: Any
) -> torch.Tensor:
    """Group normalization of this rank's shard of an input split along a reduction axis over ``group``."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group needs torch.distributed to be initialized (init_process_group).")
    fused = activation if isinstance(activation, str) else None
    y: torch.Tensor = _ShardedGroupNorm.apply(x, gamma, beta, plan, fused, group)  # type: ignore[no-untyped-call]
    return activation(y) if callable(activation) else y  # type: ignore[no-any-return]
