"""PyTorch backend: groupnorm's computation as operators in torch's dispatcher (``torch.ops.groupnorm``).

- :mod:`._ops`: the operators' schemas and registrations (composite entry point, kernels, fake
  implementations, autograd).
- :mod:`._composite`: the numerics as plain ``torch`` operations; the exact fallback of every path and
  what tracers and ``torch.func`` transforms see.
- :mod:`._cpu` and :mod:`._build`: the compiled CPU kernel for float32 (``_cpu_kernel.c``), built on first
  use with the system's C compiler; without one, the composite runs.
- :mod:`._distributed`: statistics merged across a ``torch.distributed`` group.

:func:`execute` runs a plan made by :mod:`groupnorm._api` (the generic ``groupnorm.group_norm``).
"""

from __future__ import annotations

from typing import Any

import torch

from groupnorm._plan import Activation, Plan
from groupnorm.backends.torch import _composite, _ops

NAME = "torch"

_jit: Any = torch.jit  # (its tracing predicates are not exported for type checkers)

#: False runs every call as the composite (plain differentiable ``torch`` operations) instead of the
#: operator, in this process: tests compare the two.
KERNELS = True

__all__ = ["KERNELS", "NAME", "dtype_name", "execute", "is_array", "run", "static_shape"]


def is_array(x: object) -> bool:
    return isinstance(x, torch.Tensor)


def static_shape(x: torch.Tensor) -> tuple[int | None, ...]:
    return tuple(d if isinstance(d, int) else None for d in x.shape)


def dtype_name(x: torch.Tensor) -> str:
    return _ops._DTYPE_NAMES.get(x.dtype, str(x.dtype).removeprefix("torch."))


def run(
    plan: Plan, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, activation: str | None
) -> torch.Tensor:
    """The operator on a validated plan; under ``torch.jit.trace`` the composite, so that traced graphs
    (and the ONNX exporter that reads them) hold plain ``torch`` operations."""
    if _jit.is_tracing() or not KERNELS:
        _ops._check_params(x, weight, bias)
        return _composite.composite(plan, x, weight, bias, activation)
    out: torch.Tensor = torch.ops.groupnorm.group_norm.default(
        x, plan.groups, weight, bias, plan.epsilon, plan.channels_axis, list(plan.reduction_axes), activation,
        plan.mean_close_to_zero,
    )  # fmt: skip
    return out


def _as_param(p: Any, x: torch.Tensor) -> torch.Tensor | None:
    if p is None or isinstance(p, torch.Tensor):
        return p
    return torch.as_tensor(p, device=x.device)


def execute(plan: Plan, x: torch.Tensor, gamma: Any, beta: Any, activation: Activation) -> torch.Tensor:
    """Run a validated plan on a tensor; ``gamma``/``beta`` are ``[C]`` tensors (or array-likes) or None."""
    fused = activation if isinstance(activation, str) else None
    y = run(plan, x, _as_param(gamma, x), _as_param(beta, x), fused)
    return activation(y) if callable(activation) else y  # type: ignore[no-any-return]
