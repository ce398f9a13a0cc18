"""PyTorch candidates: ``groupnorm.torch.GroupNorm`` against ``torch.nn.GroupNorm`` (followed by the
activation, where one is asked), on contiguous NCHW input and on the same input in channels_last memory.
The floor is ``Tensor.copy_`` of the input into a buffer that was written before: a fresh tensor would add
page faults that a layer writing into memory the allocator has used before does not pay. PyTorch's layers
are NCHW, so an NHWC spec is run as its NCHW transpose."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from groupnorm.bench._core import Array, Candidate, Data, Parts, guard

FRAMEWORK = "torch"


def build(data: Data) -> list[Candidate]:
    spec = data.spec
    x_nchw = spec.to_layout(data.x, "NCHW")
    dy_nchw = spec.to_layout(data.cotangent, "NCHW")
    rank = spec.rank
    channels, groups = spec.channels, spec.groups

    def inputs(channels_last: bool) -> tuple[Any, Any]:
        import torch

        x, dy = torch.from_numpy(x_nchw), torch.from_numpy(dy_nchw)
        if channels_last:
            fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(rank)
            if fmt is None:
                raise ValueError(f"channels_last needs a 4-D or 5-D input, got rank {rank}")
            x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
        return x, dy

    def activation() -> Callable[[Any], Any]:
        import torch.nn.functional as F

        if spec.activation is None:
            return lambda y: y
        fns: dict[str, Callable[[Any], Any]] = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu}
        return fns[spec.activation]

    def parts(module: Any, x: Any, dy: Any, apply: Callable[[Any], Any]) -> Parts:
        import torch

        module = module.to(x.dtype)
        params = [p for p in module.parameters() if p.requires_grad]
        leaf = x.detach().requires_grad_(True)

        def forward() -> object:
            with torch.no_grad():
                return apply(x)

        def train() -> object:
            y = apply(leaf)
            return torch.autograd.grad(y, [leaf, *params], dy)

        def output() -> Array:
            with torch.no_grad():
                y = apply(x)
            return spec.from_layout(y.numpy(), "NCHW")

        return forward, train, output

    def groupnorm_parts(channels_last: bool) -> Callable[[], Parts]:
        def factory() -> Parts:
            from groupnorm.torch import GroupNorm

            m = GroupNorm(groups, channels, eps=spec.epsilon, activation=spec.activation)
            x, dy = inputs(channels_last)
            return parts(m, x, dy, m)

        return factory

    def groupnorm_nhwc_parts() -> Parts:
        from groupnorm.torch import GroupNorm

        m = GroupNorm(
            groups,
            channels,
            eps=spec.epsilon,
            channels_axis=-1,
            reduction_axes=tuple(range(1, rank - 1)),
            activation=spec.activation,
        )
        x, dy = inputs(channels_last=True)
        perm = (0, *range(2, rank), 1)
        inv = (0, rank - 1, *range(1, rank - 1))

        def apply(t: Any) -> Any:  # NCHW (channels_last) in and out: the permutes are views
            return m(t.permute(perm)).permute(inv)

        return parts(m, x, dy, apply)

    def torch_parts(channels_last: bool) -> Callable[[], Parts]:
        def factory() -> Parts:
            import torch

            m = torch.nn.GroupNorm(groups, channels, eps=spec.epsilon)
            act = activation()
            x, dy = inputs(channels_last)
            return parts(m, x, dy, lambda t: act(m(t)))

        return factory

    def floor_parts() -> Parts:
        import torch

        x, _ = inputs(channels_last=False)
        out = torch.empty_like(x)
        out.copy_(x)  # every page written once before timing

        def copy() -> object:
            return out.copy_(x)

        return copy, None, None

    act = f" + F.{spec.activation}" if spec.activation else ""
    cl = "NCHW channels_last"
    return [
        guard("groupnorm.torch.GroupNorm", "groupnorm", "contiguous", "NCHW", groupnorm_parts(False)),
        guard(f"torch.nn.GroupNorm{act}", "peer", "contiguous", "NCHW", torch_parts(False)),
        guard("groupnorm.torch.GroupNorm", "groupnorm", "channels_last", cl, groupnorm_parts(True)),
        guard(
            "groupnorm.torch.GroupNorm (NHWC view)",
            "groupnorm",
            "channels_last",
            cl,
            groupnorm_nhwc_parts,
            secondary=True,
        ),
        guard(f"torch.nn.GroupNorm{act}", "peer", "channels_last", cl, torch_parts(True)),
        guard("torch.Tensor.copy_ (into a written buffer)", "floor", "", "NCHW", floor_parts),
    ]


def configure(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
