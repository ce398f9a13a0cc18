"""groupnorm for PyTorch: a drop-in for ``torch.nn.GroupNorm`` and ``torch.nn.functional.group_norm``.

:class:`GroupNorm` subclasses ``torch.nn.GroupNorm``: the same constructor, parameters (``weight``,
``bias``), initialisation, ``repr`` and ``state_dict``, so a model swaps the class (or calls
:func:`convert`) and keeps its checkpoints, and code that checks ``isinstance(m, torch.nn.GroupNorm)``
still finds it. The computation is the operator ``torch.ops.groupnorm.group_norm``, registered in torch's
dispatcher, so autograd, ``torch.func``, ``torch.jit``, ``torch.fx``, ``torch.compile``, ``torch.export``,
meta tensors and FakeTensor treat it as one of torch's own operators.

It is exact where torch's layer is not (a group whose mean is large against its spread, channels-last
input), and takes the whole contract through keyword arguments: any channel axis (``channels_axis=-1``
for NHWC), any reduction axes (statistics per frame of a video), a fused activation, the one-pass
variance, and statistics merged across a ``process_group`` for inputs sharded along a reduction axis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import handle_torch_function, has_torch_function_variadic

from groupnorm._plan import make_plan, resolve_activation
from groupnorm._torch_convert import convert
from groupnorm.backends import torch as _backend
from groupnorm.backends.torch import _ops
from groupnorm.backends.torch._composite import ACTIVATION

__all__ = ["GroupNorm", "convert", "group_norm"]

_jit: Any = torch.jit  # (its tracing predicates are not exported for type checkers)


def _expanded(p: object) -> bool:
    return type(p).__name__ == "ExpandedWeight"


def _schema_axes(reduction_axes: int | Sequence[int] | None) -> list[int] | None:
    """``reduction_axes`` as the operator takes them; TypeError (the plan's) for anything but ints."""
    if reduction_axes is None:
        return None
    if isinstance(reduction_axes, int) and not isinstance(reduction_axes, bool):
        return [reduction_axes]
    if isinstance(reduction_axes, Sequence) and all(type(a) is int for a in reduction_axes):
        return list(reduction_axes)
    make_plan((1,), "float32", groups=1, channels_axis=0, reduction_axes=reduction_axes)  # raises TypeError
    raise AssertionError("unreachable")


def _check_one_value(input: torch.Tensor, num_groups: int, channels_axis: int, axes: list[int] | None) -> None:
    """torch's check: statistics over a single value are refused (torch raises it in eval mode too).

    torch counts ``(N * C // G) * prod(spatial)`` values; that is 1 only where the input holds fewer than
    ``2 * G`` elements, which the first test settles without building the size list."""
    if (
        channels_axis == 1
        and axes is None
        and type(num_groups) is int
        and num_groups > 0
        and input.numel() < 2 * num_groups
        and input.dim() >= 2
    ):
        size = [input.size(0) * input.size(1) // num_groups, num_groups, *input.shape[2:]]
        count = size[0]
        for d in size[2:]:
            count *= d
        if count == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    channels_axis: int = 1,
    reduction_axes: int | Sequence[int] | None = None,
    activation: str | Callable[[torch.Tensor], torch.Tensor] | None = None,
    mean_close_to_zero: bool = False,
    process_group: Any = None,
) -> torch.Tensor:
    """Group normalization, a drop-in for ``torch.nn.functional.group_norm``.

    Args:
        input: a floating-point tensor with its channels on ``channels_axis``.
        num_groups: how many groups to split the channels into; must divide the channel count.
        weight: optional per-channel scale, shape ``[C]``, on ``input``'s device, of its dtype (or float32
            for a float16/bfloat16 input).
        bias: optional per-channel offset, with ``weight``'s constraints.
        eps: added to the variance (default 1e-5, as torch); must be >= 0.
        channels_axis: the channel axis (default 1, as torch; -1 for NHWC).
        reduction_axes: the axes the statistics run over besides the group's channels; default ``None``:
            every axis after the channel axis (torch's convention).
        activation: ``None``, ``"relu"``, ``"silu"`` or ``"gelu"`` (exact erf form, fused into the kernel), or
            any callable applied to the output.
        mean_close_to_zero: ``True`` skips the shift that keeps the variance exact for groups whose mean is
            large against their spread (one-pass sums, as TensorFlow 1.15 did).
        process_group: a ``torch.distributed`` group whose ranks each hold a shard of the input along a
            reduction axis; statistics are merged across it.

    Returns:
        A tensor of ``input``'s shape and dtype, in the memory format torch's own group norm gives it.

    Example::

        >>> x = torch.randn(2, 8, 4, 4)
        >>> y = group_norm(x, 4)                                             # as F.group_norm(x, 4)
        >>> torch.allclose(y, torch.nn.functional.group_norm(x, 4), atol=1e-5)
        True
        >>> y = group_norm(x.permute(0, 2, 3, 1), 4, channels_axis=-1, reduction_axes=(1, 2))   # NHWC
    """
    return _group_norm(
        input, num_groups, weight, bias, eps, channels_axis, reduction_axes, activation, mean_close_to_zero,
        process_group,
    )  # fmt: skip


def _group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    channels_axis: int,
    reduction_axes: int | Sequence[int] | None,
    activation: str | Callable[[torch.Tensor], torch.Tensor] | None,
    mean_close_to_zero: bool,
    process_group: Any,
) -> torch.Tensor:
    """`group_norm` with its arguments in order (the layer calls it). The common case (plain tensors, the
    default reduction axes, a fused activation or none, the compiled operator) goes straight to the
    operator, whose C++ kernel validates the arguments: a small layer's call costs what torch's does."""
    if (
        reduction_axes is None
        and process_group is None
        and type(input) is torch.Tensor
        and type(num_groups) is int
        and (activation is None or type(activation) is str)
        and not has_torch_function_variadic(weight, bias)
        and _backend.KERNELS
        and not _jit.is_tracing()
    ):
        _check_one_value(input, num_groups, channels_axis, None)
        return torch.ops.groupnorm.group_norm.default(  # type: ignore[no-any-return]
            input, num_groups, weight, bias, eps, channels_axis, None,
            None if activation is None else resolve_activation(activation), mean_close_to_zero,
        )  # fmt: skip
    if _expanded(weight) or _expanded(bias):
        # per-sample gradients (torch.nn.utils._per_sample_grad): ExpandedWeights knows torch's group norm
        if channels_axis != 1 or reduction_axes is not None or mean_close_to_zero or process_group is not None:
            raise RuntimeError("per-sample gradients with expanded weights support torch's own arguments only")
        act = resolve_activation(activation)
        y = torch.nn.functional.group_norm(input, num_groups, weight, bias, eps)
        return ACTIVATION[act](y) if isinstance(act, str) else act(y) if callable(act) else y
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(  # type: ignore[no-any-return]
            group_norm, (input, weight, bias), input, num_groups, weight=weight, bias=bias, eps=eps,
            channels_axis=channels_axis, reduction_axes=reduction_axes, activation=activation,
            mean_close_to_zero=mean_close_to_zero, process_group=process_group,
        )  # fmt: skip
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"group_norm expects a torch.Tensor input, got {type(input).__qualname__}.")
    act = resolve_activation(activation)
    fused = act if isinstance(act, str) else None
    axes = _schema_axes(reduction_axes)
    _check_one_value(input, num_groups, channels_axis, axes)
    if process_group is not None or _jit.is_tracing() or type(num_groups) is not int or not _backend.KERNELS:
        plan = _ops.plan_of(input, num_groups, weight, bias, eps, channels_axis, axes, mean_close_to_zero)
        if process_group is not None:
            from groupnorm.backends.torch._distributed import sharded_group_norm

            return sharded_group_norm(plan, input, weight, bias, act, process_group)
        y = _backend.run(plan, input, weight, bias, fused)
    else:
        y = torch.ops.groupnorm.group_norm.default(
            input, num_groups, weight, bias, eps, channels_axis, axes, fused, mean_close_to_zero
        )
    return act(y) if callable(act) else y


class GroupNorm(nn.GroupNorm):
    """Group normalization over a mini-batch, a drop-in for (and a subclass of) ``torch.nn.GroupNorm``.

    Args:
        num_groups: how many groups to split the channels into; must divide ``num_channels``.
        num_channels: the channel count ``C``.
        eps: added to the variance (default 1e-5); must be >= 0.
        affine: whether to learn a per-channel ``weight`` (ones) and ``bias`` (zeros), shape ``[C]``.
        device: where to create the parameters.
        dtype: the parameters' dtype.
        bias: with ``affine``, whether to learn ``bias`` too (default True).
        channels_axis: the channel axis of the input (default 1, as torch; -1 for NHWC).
        reduction_axes: the axes statistics run over besides the group's channels; default ``None``: every
            axis after the channel axis.
        activation: ``None``, ``"relu"``, ``"silu"``, ``"gelu"`` (fused), or a callable applied after.
        mean_close_to_zero: one-pass sums instead of the shifted, exact variance.
        process_group: a ``torch.distributed`` group over which an input sharded along a reduction axis
            is normalized as a whole.

    Example::

        >>> m = GroupNorm(32, 64)                                  # NCHW, like torch.nn.GroupNorm(32, 64)
        >>> m = GroupNorm(32, 64, channels_axis=-1)                # NHWC
        >>> m = GroupNorm(8, 64, reduction_axes=(-2, -1))          # (N, C, T, H, W): statistics per frame
        >>> isinstance(m, torch.nn.GroupNorm)
        True
    """

    __constants__ = [  # noqa: RUF012  (TorchScript reads it; torch.nn.GroupNorm declares it unannotated)
        *nn.GroupNorm.__constants__,
        "channels_axis",
        "mean_close_to_zero",
        "_activation_name",
    ]
    channels_axis: int
    mean_close_to_zero: bool

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
        try:
            make_plan(
                (num_channels,) if type(num_channels) is int and num_channels >= 0 else None,
                "float32",
                groups=num_groups,
                channels_axis=0,
                reduction_axes=(),
                epsilon=eps,
                mean_close_to_zero=mean_close_to_zero,
            )
        except ValueError as e:  # the contract's phrase, after torch's where torch raises too
            if num_groups == 0:
                raise _ops.GroupNormZeroGroups(f"integer modulo by zero: {e}") from None
            if isinstance(num_channels, int) and isinstance(num_groups, int) and num_channels % num_groups:
                raise ValueError(
                    f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups}). {e}"
                ) from None
            raise
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias)
        self.channels_axis = channels_axis
        self.reduction_axes = reduction_axes
        # (TorchScript infers these attributes' types from their values)
        self._reduction_axes: list[int] | None = _schema_axes(reduction_axes)
        self.activation = resolve_activation(activation)
        self._activation_name: str | None = self.activation if isinstance(self.activation, str) else None
        self.mean_close_to_zero = mean_close_to_zero
        self.process_group = process_group

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if _jit.is_scripting():
            return torch.ops.groupnorm.group_norm(  # type: ignore[no-any-return]
                input, self.num_groups, self.weight, self.bias, self.eps, self.channels_axis,
                self._reduction_axes, self._activation_name, self.mean_close_to_zero,
            )  # fmt: skip
        return self._forward(input)

    @torch.jit.unused
    def _forward(self, input: torch.Tensor) -> torch.Tensor:
        return _group_norm(
            input,
            self.num_groups,
            self.weight,
            self.bias,
            self.eps,
            self.channels_axis,
            self._reduction_axes,
            self.activation,
            self.mean_close_to_zero,
            self.process_group,
        )

    def extra_repr(self) -> str:
        text = super().extra_repr()
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
