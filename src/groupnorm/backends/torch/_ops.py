"""groupnorm's operators in torch's dispatcher, ``torch.ops.groupnorm``.

- ``group_norm(input, num_groups, weight, bias, eps, channels_axis, reduction_axes, activation,
  mean_close_to_zero) -> Tensor``: the public operator, ``torch.nn.functional.group_norm``'s arguments
  followed by the contract's. A composite (``CompositeImplicitAutograd``): it validates the arguments (the
  plan's errors, as the exception classes torch raises, with torch's wording), then calls ``forward``;
  under ``torch.func`` transforms and forward-mode AD it runs the differentiable composite instead, so
  every transform sees plain ``torch`` operations.
- ``forward(...) -> (out, pre, shift, mean, rstd)``: the computation and the statistics the backward
  pass needs (see :mod:`._composite`). Kernels: the compiled CPU kernel for float32, the Triton kernels on
  CUDA, the composite elsewhere. A fake implementation gives shapes and strides to FakeTensor, meta
  tensors, ``torch.compile`` and ``torch.export``; an autograd kernel gives its gradient through
  ``backward``, and higher-order gradients through the composite.
- ``backward(...) -> (grad_input, grad_weight, grad_bias)``: gradients from the saved statistics; an empty
  tensor stands for a gradient not asked for.

The output has the memory format torch's own group norm gives the same input:
``input.suggest_memory_format()`` (contiguous or channels-last).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from torch._prims_common import suggest_memory_format
from torch.autograd import forward_ad

from groupnorm._plan import ACTIVATIONS, Plan, make_plan
from groupnorm.backends.torch import _composite, _cpu

__all__ = ["plan_of"]

_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}

_LIB = torch.library.Library("groupnorm", "DEF")
_LIB.define(
    "group_norm(Tensor input, int num_groups, Tensor? weight=None, Tensor? bias=None, float eps=1e-05, "
    "int channels_axis=1, int[]? reduction_axes=None, str? activation=None, bool mean_close_to_zero=False) -> Tensor"
)
_ARGS = "int num_groups, int channels_axis, int[] reduction_axes, float eps, bool mean_close_to_zero, str? activation"
_LIB.define(
    f"forward(Tensor input, Tensor? weight, Tensor? bias, {_ARGS}, bool keep_pre) "
    "-> (Tensor out, Tensor pre, Tensor shift, Tensor mean, Tensor rstd)"
)
_LIB.define(
    "_group_norm_python(Tensor input, int num_groups, Tensor? weight=None, Tensor? bias=None, float eps=1e-05, "
    "int channels_axis=1, int[]? reduction_axes=None, str? activation=None, bool mean_close_to_zero=False) -> Tensor"
)
_LIB.define(
    f"_forward_python(Tensor input, Tensor? weight, Tensor? bias, {_ARGS}, bool keep_pre) "
    "-> (Tensor out, Tensor pre, Tensor shift, Tensor mean, Tensor rstd)"
)
_LIB.define(
    "_backward_python(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor pre, Tensor shift, "
    f"Tensor mean, Tensor rstd, {_ARGS}, bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, "
    "Tensor grad_bias)"
)
_LIB.define(
    f"_composite_grad(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, {_ARGS}, bool[3] output_mask) "
    "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)"
)
_LIB.define(
    "backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor pre, Tensor shift, Tensor mean, "
    f"Tensor rstd, {_ARGS}, bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)"
)


# --------------------------------------------------------------------------------------------------
# validation, in torch's terms


#: torch's names of the dtypes it has no group norm kernel for, as its errors spell them
_SCALAR_NAMES = {
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}  # fmt: skip


class GroupNormError(ValueError, RuntimeError):
    """A contract error (ValueError) where torch raises RuntimeError."""


class GroupNormZeroGroups(ValueError, ZeroDivisionError):
    """``num_groups=0``: torch divides by it."""


class GroupNormDtypeError(TypeError, NotImplementedError):
    """A non-floating input: torch has no kernel for it."""


def _torch_error(e: Exception, x: torch.Tensor, num_groups: object, weight: Any, bias: Any) -> Exception:
    """The plan's error ``e`` as the exception torch raises in the same case, with torch's wording first."""
    text = str(e)
    shape = list(x.shape)
    if isinstance(e, TypeError):
        if "floating-point" in text:
            name = _SCALAR_NAMES.get(x.dtype, str(x.dtype))
            return GroupNormDtypeError(f"\"GroupNormKernelImpl\" not implemented for '{name}': {text}")
        if text.startswith("groups must be") and isinstance(num_groups, bool):
            return TypeError(f"group_norm(): argument 'num_groups' (position 2) must be int, not bool: {text}")
        return e
    if text.startswith("Axis is out of bounds") and x.dim() < 2:
        return GroupNormError(f"Expected at least 2 dimensions for input tensor but received {x.dim()}. {text}")
    if "groups must be a positive int" in text and num_groups == 0:
        return GroupNormZeroGroups(f"integer division or modulo by zero: {text}")
    if "groups must be a positive int" in text:
        return GroupNormError(f"Expected num groups to be greater than 0, got {num_groups}. {text}")
    if "not commensurate" in text or text.startswith("Invalid groups"):
        return GroupNormError(
            "Expected number of channels in input to be divisible by num_groups, but got input of shape "
            f"{shape} and num_groups={num_groups}. {text}"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if text.startswith(("gamma" if name == "weight" else "beta") + " must have shape"):
            return GroupNormError(
                f"Expected {name} to be a vector of size equal to the number of channels in input, but got "
                f"{name} of shape {list(p.shape)} and input of shape {shape}. {text}"
            )
    return GroupNormError(text)


_PLANS: dict[tuple[Any, ...], Plan] = {}


def _dims(shape: Sequence[Any]) -> tuple[int | None, ...]:
    """A static shape for the plan. A symbolic size (``torch.compile``, ``torch.export``) is validated at
    the value it was traced with, without a guard: torch's kernels take any size there, and so do
    groupnorm's. Sizes that ``torch.jit.trace`` records as tensors are read as ints."""
    return tuple(_dim(d) for d in shape)


def _dim(d: Any) -> int | None:
    if isinstance(d, int):
        return d
    if isinstance(d, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        return int(optimization_hint(d, fallback=1))
    if isinstance(d, torch.Tensor):
        return int(d)
    return None


def plan_of(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    channels_axis: int,
    reduction_axes: Sequence[int] | None,
    mean_close_to_zero: bool,
) -> Plan:
    """The validated plan; ``reduction_axes=None`` means every axis after the channel axis (torch's
    convention). Errors are torch's exception classes (see :func:`_torch_error`)."""
    axes = None if reduction_axes is None else tuple(reduction_axes)
    key: tuple[Any, ...] = (
        x.shape, x.dtype, num_groups, channels_axis, axes, eps, mean_close_to_zero,
        None if weight is None else weight.shape, None if bias is None else bias.shape,
    )  # fmt: skip
    cacheable = True
    try:
        plan = _PLANS.get(key)
    except TypeError:  # symbolic sizes do not hash
        plan, cacheable = None, False
    if plan is not None:
        return plan
    ndim = x.dim()
    if axes is None:
        ok = isinstance(channels_axis, int) and -ndim <= channels_axis < ndim
        axes = tuple(range(channels_axis % ndim + 1, ndim)) if ok else ()
    try:
        plan = make_plan(
            _dims(x.shape),
            _DTYPE_NAMES.get(x.dtype, str(x.dtype).removeprefix("torch.")),
            groups=num_groups,
            channels_axis=channels_axis,
            reduction_axes=axes,
            epsilon=eps,
            mean_close_to_zero=mean_close_to_zero,
            gamma_shape=None if weight is None else _dims(weight.shape),
            beta_shape=None if bias is None else _dims(bias.shape),
        )
    except (ValueError, TypeError) as e:
        raise _torch_error(e, x, num_groups, weight, bias) from None
    if cacheable:
        if len(_PLANS) > 1024:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _check_params(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    """torch's rules for the parameters: on the input's device; of its dtype, or float32 for a
    half-precision input."""
    for p in (weight, bias):
        if p is None:
            continue
        if p.device != x.device:
            raise RuntimeError(
                "Expected all tensors to be on the same device: "
                f"Tensor on device {p.device} is not on the expected device {x.device}!"
            )
        if p.dtype != x.dtype and not (p.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
            if x.dtype == torch.float32:
                raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
            raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")


def _activation(activation: str | None) -> str | None:
    if activation is None or activation in ACTIVATIONS:
        return activation
    raise ValueError(f"Unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}.")


def _transformed(*tensors: torch.Tensor | None) -> bool:
    """Whether a ``torch.func`` transform or forward-mode AD sees these tensors."""
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if any(t is not None and is_wrapped(t) for t in tensors):
        return True
    if forward_ad._current_level >= 0:
        return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    return False


def _requires_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------------------------------
# group_norm: the public composite


def _group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    channels_axis: int = 1,
    reduction_axes: list[int] | None = None,
    activation: str | None = None,
    mean_close_to_zero: bool = False,
) -> torch.Tensor:
    # (the dispatcher leaves out trailing arguments equal to the schema's defaults: these are those)
    plan = plan_of(input, num_groups, weight, bias, eps, channels_axis, reduction_axes, mean_close_to_zero)
    act = _activation(activation)
    _check_params(input, weight, bias)
    if _transformed(input, weight, bias) or torch.compiler.is_exporting():
        # torch.export (and the ONNX exporter on it) records plain torch operations: any runtime runs them
        return _composite.composite(plan, input, weight, bias, act)
    keep_pre = act is not None and _requires_grad(input, weight, bias)
    axes = list(plan.reduction_axes)
    out: torch.Tensor = torch.ops.groupnorm.forward.default(
        input, weight, bias, num_groups, plan.channels_axis, axes, eps, mean_close_to_zero, act, keep_pre
    )[0]
    return out


_LIB.impl("_group_norm_python", _group_norm, "CompositeImplicitAutograd")


# --------------------------------------------------------------------------------------------------
# forward and backward: kernels


def _format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of the output (torch's ``suggest_memory_format``)."""
    return suggest_memory_format(x)


def _in_format(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return x if x.is_contiguous(memory_format=fmt) else x.contiguous(memory_format=fmt)


@lru_cache(maxsize=1024)
def _strides(shape: tuple[int, ...], fmt: torch.memory_format) -> tuple[int, ...]:
    return tuple(torch.empty(shape, device="meta", memory_format=fmt).stride())


def _as(t: torch.Tensor, shape: Sequence[int], fmt: torch.memory_format) -> torch.Tensor:
    """``t`` with exactly the strides of a new tensor of ``shape`` in ``fmt`` (what the fake gives)."""
    if tuple(t.stride()) == _strides(tuple(shape), fmt):
        return t
    return torch.empty(shape, dtype=t.dtype, device=t.device, memory_format=fmt).copy_(t)


def _stats_shape(plan: Plan, x: torch.Tensor) -> tuple[Any, int]:
    return math.prod(x.shape[a] for a in plan.kept_axes), plan.groups


def _gpu(plan: Plan, x: torch.Tensor) -> bool:
    """Whether the Triton kernels take this input (imported only for a non-CPU tensor)."""
    from groupnorm.backends.torch import _triton

    return _triton.available(x) and _triton.supports(plan, x)


def _forward(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    channels_axis: int,
    reduction_axes: list[int],
    eps: float,
    mean_close_to_zero: bool,
    activation: str | None,
    keep_pre: bool,
) -> tuple[torch.Tensor, ...]:
    plan = plan_of(input, num_groups, weight, bias, eps, channels_axis, reduction_axes, mean_close_to_zero)
    fmt = _format(input)
    x = _in_format(input, fmt)
    keep_pre = keep_pre and activation is not None
    if x.numel() == 0:
        return _empty_forward(plan, x, fmt, keep_pre)
    if x.device.type != "cpu" and _gpu(plan, x):
        from groupnorm.backends.torch import _triton

        out, shift, mean, rstd = _triton.forward(plan, x, weight, bias, activation)
        return _as(out, x.shape, fmt), x.new_empty(0), shift, mean, rstd  # (its backward recomputes pre)
    found = _cpu.forward(plan, x, weight, bias, activation, keep_pre) if x.device.type == "cpu" else None
    if found is not None:
        out, pre, shift, mean, rstd = found
        return _as(out, x.shape, fmt), (_as(pre, x.shape, fmt) if keep_pre else pre), shift, mean, rstd
    shift, mean, rstd = _composite.statistics(plan, x)
    out, pre = _composite.apply(plan, x, weight, bias, shift, mean, rstd, activation)
    pre = _as(pre, x.shape, fmt) if keep_pre else x.new_empty(0)
    return _as(out, x.shape, fmt), pre, shift, mean, rstd


def _empty_forward(plan: Plan, x: torch.Tensor, fmt: torch.memory_format, keep_pre: bool) -> tuple[torch.Tensor, ...]:
    work = _composite.work_dtype(x.dtype)
    shape = _stats_shape(plan, x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    pre = torch.empty_like(out) if keep_pre else x.new_empty(0)
    zeros = [torch.zeros(shape, dtype=work, device=x.device) for _ in range(2)]
    rstd = torch.full(shape, 1 / math.sqrt(plan.epsilon) if plan.epsilon else math.inf, dtype=work, device=x.device)
    return out, pre, zeros[0], zeros[1], rstd


def _backward(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    pre: torch.Tensor,
    shift: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    channels_axis: int,
    reduction_axes: list[int],
    eps: float,
    mean_close_to_zero: bool,
    activation: str | None,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = plan_of(input, num_groups, weight, bias, eps, channels_axis, reduction_axes, mean_close_to_zero)
    fmt = _format(input)
    x = _in_format(input, fmt)
    needs = (bool(output_mask[0]), bool(output_mask[1]), bool(output_mask[2]))
    found = None
    if x.numel() and x.device.type != "cpu" and _gpu(plan, x):
        from groupnorm.backends.torch import _triton

        found = _triton.backward(plan, x, weight, bias, activation, shift, mean, rstd, grad_out, needs)
    elif x.numel() and x.device.type == "cpu":
        found = _cpu.backward(plan, grad_out, x, weight, bias, pre, shift, mean, rstd, activation, needs)
    if found is None:
        if x.numel():
            found = _composite.backward(plan, grad_out, x, weight, bias, shift, mean, rstd, activation, needs)
        else:
            zero = [None if p is None else torch.zeros_like(p) for p in (weight, bias)]
            found = (torch.empty_like(x), zero[0], zero[1])
    dx, dweight, dbias = found
    empty = x.new_empty(0)
    return (
        _as(dx, x.shape, fmt) if needs[0] and dx is not None else empty,
        dweight if needs[1] and dweight is not None else empty,
        dbias if needs[2] and dbias is not None else empty,
    )


for _name, _kernel in (("forward", _forward), ("backward", _backward)):
    _LIB.impl(_name, _kernel, "CompositeExplicitAutograd")
    _LIB.impl(f"_{_name}_python", _kernel, "CompositeExplicitAutograd")


@torch.library.register_fake("groupnorm::forward", lib=_LIB)
def _forward_fake(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    channels_axis: int,
    reduction_axes: list[int],
    eps: float,
    mean_close_to_zero: bool,
    activation: str | None,
    keep_pre: bool,
) -> tuple[torch.Tensor, ...]:
    plan = plan_of(input, num_groups, weight, bias, eps, channels_axis, reduction_axes, mean_close_to_zero)
    fmt = _format(input)
    out = torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=fmt)
    pre = torch.empty_like(out) if keep_pre and activation is not None else input.new_empty(0)
    work = _composite.work_dtype(input.dtype)
    shape = _stats_shape(plan, input)
    return (out, pre, *(input.new_empty(shape, dtype=work) for _ in range(3)))


@torch.library.register_fake("groupnorm::backward", lib=_LIB)
def _backward_fake(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    pre: torch.Tensor,
    shift: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    channels_axis: int,
    reduction_axes: list[int],
    eps: float,
    mean_close_to_zero: bool,
    activation: str | None,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    empty = input.new_empty(0)
    fmt = _format(input)
    dx = torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=fmt)
    return (
        dx if output_mask[0] else empty,
        torch.empty_like(weight) if output_mask[1] and weight is not None else empty,
        torch.empty_like(bias) if output_mask[2] and bias is not None else empty,
    )


# --------------------------------------------------------------------------------------------------
# autograd


class _Forward(torch.autograd.Function):
    """``forward``'s gradient: ``backward`` from the saved statistics; with ``create_graph``, the gradient
    of the composite, which autograd can differentiate again."""

    @staticmethod
    def forward(input: torch.Tensor, weight: Any, bias: Any, *args: Any) -> Any:  # type: ignore[override]
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.groupnorm.forward.default(input, weight, bias, *args)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        input, weight, bias, *args = inputs
        _, pre, shift, mean, rstd = output
        ctx.save_for_backward(input, weight, bias, pre, shift, mean, rstd)
        ctx.args = args
        ctx.mark_non_differentiable(pre, shift, mean, rstd)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        input, weight, bias, pre, shift, mean, rstd = ctx.saved_tensors
        num_groups, channels_axis, axes, eps, mean_close_to_zero, activation, _ = ctx.args
        needs = tuple(bool(n) for n in ctx.needs_input_grad[:3])
        rest = (None,) * len(ctx.args)
        if torch.is_grad_enabled():  # create_graph: a gradient autograd can differentiate again
            grads = torch.ops.groupnorm._composite_grad.default(
                dy, input, weight, bias, num_groups, channels_axis, axes, eps, mean_close_to_zero, activation,
                list(needs),
            )  # fmt: skip
        else:
            grads = torch.ops.groupnorm.backward.default(
                dy, input, weight, bias, pre, shift, mean, rstd, num_groups, channels_axis, axes, eps,
                mean_close_to_zero, activation, list(needs),
            )  # fmt: skip
        return (*(g if need else None for g, need in zip(grads, needs, strict=True)), *rest)


def _forward_autograd(input: torch.Tensor, weight: Any, bias: Any, *args: Any) -> Any:
    if _requires_grad(input, weight, bias):
        return _Forward.apply(input, weight, bias, *args)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.groupnorm.forward.default(input, weight, bias, *args)


def _composite_grad(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    channels_axis: int,
    reduction_axes: list[int],
    eps: float,
    mean_close_to_zero: bool,
    activation: str | None,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients as differentiable operations of the composite (for ``create_graph``)."""
    plan = plan_of(input, num_groups, weight, bias, eps, channels_axis, reduction_axes, mean_close_to_zero)
    tensors = (input, weight, bias)
    wanted = [t is not None and need and t.requires_grad for t, need in zip(tensors, output_mask, strict=True)]
    with torch.enable_grad():
        y = _composite.composite(plan, input, weight, bias, activation)
        inputs = [t for t, w in zip(tensors, wanted, strict=True) if w and t is not None]
        found = iter(torch.autograd.grad(y, inputs, grad_out, create_graph=True, allow_unused=True) if inputs else ())
    grads = []
    for w in wanted:
        g = next(found) if w else None
        grads.append(input.new_empty(0) if g is None else g)
    return grads[0], grads[1], grads[2]


_LIB.impl("_composite_grad", _composite_grad, "CompositeImplicitAutograd")

#: whether the C++ operators (``_ops.cpp``) are loaded; without them, Python kernels serve the same operators
CPP = False


def _register() -> None:
    global CPP
    from groupnorm.backends.torch import _build

    path = _build.load_ops()
    if path is not None:
        try:
            torch.ops.load_library(str(path))
            CPP = True
            return
        except OSError as e:
            import warnings

            warnings.warn(
                f"groupnorm: loading {path} failed ({e}); using the exact but slower path", RuntimeWarning, stacklevel=2
            )
    _LIB.impl("group_norm", _group_norm, "CompositeImplicitAutograd")
    _LIB.impl("forward", _forward_autograd, "Autograd")


_register()
