"""NumPy candidates: ``groupnorm.group_norm`` on arrays (backward: ``groupnorm.numpy.vjp``) against a plain
NumPy formulation (reshape, mean and var, and its textbook backward pass), and ``numpy.copy`` as the floor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from groupnorm.bench._core import Candidate, Data, Parts, Spec, guard

FRAMEWORK = "numpy"

Array = NDArray[Any]

_ACT: dict[str, tuple[Callable[[Array], Array], Callable[[Array], Array]]] = {
    "relu": (lambda p: np.maximum(p, 0), lambda p: (p > 0).astype(p.dtype)),
    "silu": (
        lambda p: p / (1 + np.exp(-p)),
        lambda p: (s := 1 / (1 + np.exp(-p))) * (1 + p * (1 - s)),
    ),
}


def _plain_views(spec: Spec, x: Array) -> tuple[Array, tuple[int, ...], tuple[int, ...]]:
    """``x`` viewed so that every group is reduced over the returned axes, and the parameter shape."""
    n, g, c = spec.shape[0], spec.groups, spec.channels
    if spec.layout == "NCHW":
        return x.reshape(n, g, c // g, -1), (2, 3), (1, g, c // g, 1)
    return x.reshape(n, -1, g, c // g), (1, 3), (1, 1, g, c // g)


def plain_forward(spec: Spec, x: Array, gamma: Array, beta: Array) -> tuple[Array, Array, Array]:
    """The plain formulation: returns ``(y, xhat, rstd)`` with ``xhat`` the normalized input."""
    xv, axes, pshape = _plain_views(spec, x)
    mean = xv.mean(axis=axes, keepdims=True)
    var = xv.var(axis=axes, keepdims=True)
    rstd = 1 / np.sqrt(var + spec.epsilon)
    xhat = (xv - mean) * rstd
    y = xhat * gamma.reshape(pshape) + beta.reshape(pshape)
    if spec.activation is not None:
        y = _ACT[spec.activation][0](y)
    return y.reshape(x.shape), xhat, rstd


def plain_backward(
    spec: Spec, x: Array, xhat: Array, rstd: Array, gamma: Array, beta: Array, dy: Array
) -> tuple[Array, Array, Array]:
    """Gradients of ``sum(y * dy)`` of the plain formulation with respect to x, gamma and beta, from the
    forward pass's saved ``xhat`` and ``rstd``."""
    dyv, axes, pshape = _plain_views(spec, dy)
    if spec.activation is not None:
        dyv = dyv * _ACT[spec.activation][1](xhat * gamma.reshape(pshape) + beta.reshape(pshape))
    param_axes = tuple(a for a in range(4) if pshape[a] == 1)
    dbeta = dyv.sum(axis=param_axes).reshape(-1)
    dgamma = (dyv * xhat).sum(axis=param_axes).reshape(-1)
    dxhat = dyv * gamma.reshape(pshape)
    m1 = dxhat.mean(axis=axes, keepdims=True)
    m2 = (dxhat * xhat).mean(axis=axes, keepdims=True)
    dx = rstd * (dxhat - m1 - xhat * m2)
    return dx.reshape(x.shape).astype(x.dtype), dgamma.astype(gamma.dtype), dbeta.astype(beta.dtype)


def build(data: Data) -> list[Candidate]:
    spec, x, dy = data.spec, data.x, data.cotangent
    gamma = np.ones(spec.channels, x.dtype)
    beta = np.zeros(spec.channels, x.dtype)
    layout = spec.layout

    def groupnorm_parts() -> Parts:
        import groupnorm
        import groupnorm.numpy

        kwargs: dict[str, Any] = {
            "groups": spec.groups,
            "channels_axis": spec.channels_axis,
            "reduction_axes": spec.reduction_axes,
            "gamma": gamma,
            "beta": beta,
            "epsilon": spec.epsilon,
            "activation_fn": spec.activation,
        }

        def forward() -> Array:
            return groupnorm.group_norm(x, **kwargs)

        def train() -> object:
            y = groupnorm.group_norm(x, **kwargs)
            return y, groupnorm.numpy.vjp(x, dy, **kwargs)

        if spec.activation == "gelu":
            return forward, None, forward
        return forward, train, forward

    def plain_parts() -> Parts:
        if spec.activation not in (None, *_ACT):
            raise ValueError(f"the plain formulation has no {spec.activation} activation")

        def forward() -> Array:
            return plain_forward(spec, x, gamma, beta)[0]

        def train() -> object:
            y, xhat, rstd = plain_forward(spec, x, gamma, beta)
            return y, plain_backward(spec, x, xhat, rstd, gamma, beta, dy)

        return forward, train, forward

    def floor_parts() -> Parts:
        return (lambda: np.copy(x)), None, None

    return [
        guard("groupnorm.group_norm", "groupnorm", "", layout, groupnorm_parts),
        guard("plain NumPy (reshape, mean, var)", "peer", "", layout, plain_parts),
        guard("numpy.copy", "floor", "", layout, floor_parts),
    ]


def configure(threads: int) -> None:
    """NumPy's element-wise work is single-threaded: nothing to set."""
