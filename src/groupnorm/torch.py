"""groupnorm for PyTorch: a drop-in for ``torch.nn.GroupNorm`` and ``torch.nn.functional.group_norm``.

``GroupNorm(num_groups, num_channels, eps=1e-5, affine=True)`` has ``torch.nn.GroupNorm``'s signature,
defaults, parameters (``weight``, ``bias``), initialisation, ``repr`` and ``state_dict``, so a model swaps
the class and keeps its checkpoints. It is exact where torch's layer is not (a group whose mean is large
against its spread, channels-last input) and takes the whole contract through keyword arguments: any
channel axis (``channels_axis=-1`` for NHWC), any reduction axes (statistics per frame of a video), a
fused activation, the one-pass variance, and statistics merged across a ``process_group`` for inputs
sharded along a reduction axis.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from groupnorm._api import plan_for
from groupnorm._plan import make_plan, resolve_activation
from groupnorm.backends import torch as _backend

__all__ = ["GroupNorm", "group_norm"]

#: torch.nn.GroupNorm has a keyword-only ``bias`` flag (and shows it in its repr) from torch 2.6 on.
_TORCH_REPR_HAS_BIAS = "bias" in inspect.signature(nn.GroupNorm.__init__).parameters


def _reduction_axes(ndim: int, channels_axis: int, reduction_axes: int | Sequence[int] | None) -> Any:
    """``None`` means every axis after the channel axis (torch's convention)."""
    if reduction_axes is not None:
        return reduction_axes
    if isinstance(channels_axis, int) and not isinstance(channels_axis, bool) and -ndim <= channels_axis < ndim:
        return tuple(range(channels_axis % ndim + 1, ndim))
    return ()  # the plan reports the bad channel axis


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    channels_axis: int = 1,
    reduction_axes: int | Sequence[int] | None = None,
    activation: Any = None,
    mean_close_to_zero: bool = False,
    process_group: Any = None,
) -> torch.Tensor:
    """Group normalization, a drop-in for ``torch.nn.functional.group_norm``.

    ``input`` has its channels on ``channels_axis`` (1 by default, as in torch); statistics are taken over
    each group of ``num_channels // num_groups`` channels and ``reduction_axes`` (by default every axis
    after the channel axis), separately for every index of the other axes. ``weight`` and ``bias`` are
    optional ``[C]`` tensors. ``activation`` is ``None``, a callable, or ``"relu"``, ``"silu"`` or
    ``"gelu"`` (fused). ``mean_close_to_zero=True`` skips the shift that makes the variance exact for
    groups with a large mean. ``process_group``: a ``torch.distributed`` group whose ranks each hold a
    shard of the input along a reduction axis; statistics are merged across it.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"group_norm expects a torch.Tensor input, got {type(input).__qualname__}.")
    plan = plan_for(
        _backend,  # type: ignore[arg-type]
        input,
        groups=num_groups,
        channels_axis=channels_axis,
        reduction_axes=_reduction_axes(input.dim(), channels_axis, reduction_axes),
        gamma=weight,
        beta=bias,
        epsilon=eps,
        mean_close_to_zero=mean_close_to_zero,
    )
    act = resolve_activation(activation)
    if process_group is not None:
        from groupnorm._torch_distributed import sharded_group_norm

        return sharded_group_norm(plan, input, weight, bias, act, process_group)
    return _backend.execute(plan, input, weight, bias, act)  # type: ignore[no-any-return]


class GroupNorm(nn.Module):
    """Group normalization over a mini-batch, a drop-in for ``torch.nn.GroupNorm``.

    Same positional signature, defaults, parameters and ``state_dict`` as ``torch.nn.GroupNorm``: with
    ``affine=True``, ``weight`` (ones) and ``bias`` (zeros, unless ``bias=False``) of shape
    ``[num_channels]``. The keyword-only
    arguments take the rest of the contract; see :func:`group_norm`.

    Example::

        >>> m = GroupNorm(32, 64)                                  # NCHW, like torch.nn.GroupNorm(32, 64)
        >>> m = GroupNorm(32, 64, channels_axis=-1)                # NHWC
        >>> m = GroupNorm(8, 64, reduction_axes=(-2, -1))          # (N, C, T, H, W): statistics per frame
    """

    __constants__: ClassVar[list[str]] = ["num_groups", "num_channels", "eps", "affine"]
    num_groups: int
    num_channels: int
    eps: float
    affine: bool

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        channels_axis: int = 1,
        reduction_axes: int | Sequence[int] | None = None,
        activation: Any = None,
        mean_close_to_zero: bool = False,
        process_group: Any = None,
    ) -> None:
        super().__init__()
        # Validate what can be validated without an input, with the contract's own errors.
        make_plan(
            (num_channels,) if isinstance(num_channels, int) else None,
            "float32",
            groups=num_groups,
            channels_axis=0,
            reduction_axes=(),
            epsilon=eps,
            mean_close_to_zero=mean_close_to_zero,
        )
        self.activation = resolve_activation(activation)
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self.channels_axis = channels_axis
        self.reduction_axes = reduction_axes
        self.mean_close_to_zero = mean_close_to_zero
        self.process_group = process_group
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        if self.affine:
            self.weight = nn.Parameter(torch.empty(num_channels, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_channels, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return group_norm(
            input,
            self.num_groups,
            self.weight,
            self.bias,
            self.eps,
            channels_axis=self.channels_axis,
            reduction_axes=self.reduction_axes,
            activation=self.activation,
            mean_close_to_zero=self.mean_close_to_zero,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        text = f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
        if _TORCH_REPR_HAS_BIAS:
            text += f", bias={self.bias is not None}"
        if self.channels_axis != 1:
            text += f", channels_axis={self.channels_axis}"
        if self.reduction_axes is not None:
            text += f", reduction_axes={self.reduction_axes}"
        if self.activation is not None:
            act = self.activation
            text += f", activation={act!r}" if isinstance(act, str) else f", activation={getattr(act, '__name__', act)}"
        if self.mean_close_to_zero:
            text += ", mean_close_to_zero=True"
        if self.process_group is not None:
            text += ", process_group=..."
        return text
