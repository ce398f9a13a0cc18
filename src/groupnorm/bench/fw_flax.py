"""Flax candidates: ``groupnorm.flax.GroupNorm`` against ``flax.nnx.GroupNorm`` (followed by the activation,
where one is asked), each split into a graph definition and its state and run as a ``jax.jit``-compiled
pure function, waiting with ``block_until_ready``; ``x * s`` under ``jax.jit`` is the floor. Flax's layer
is channels-last, so an NCHW spec is run as its NHWC transpose."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from groupnorm.bench._core import Array, Candidate, Data, Parts, guard

FRAMEWORK = "flax"


def _wait(tree: Any) -> Any:
    import jax

    return jax.block_until_ready(tree)  # type: ignore[no-untyped-call]


def build(data: Data) -> list[Candidate]:
    spec = data.spec
    x_nhwc = spec.to_layout(data.x, "NHWC")
    dy_nhwc = spec.to_layout(data.cotangent, "NHWC")
    dtype_kwargs: dict[str, Any] = {} if spec.dtype == "float32" else {"dtype": spec.dtype}

    def parts(make: Callable[[Any], Any]) -> Parts:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        module = make(nnx)
        graphdef, state = nnx.split(module)

        def apply(state: Any, x: Any) -> Any:
            return nnx.merge(graphdef, state)(x)

        def loss(state: Any, x: Any, dy: Any) -> Any:
            return jnp.sum(apply(state, x).astype(jnp.float32) * dy.astype(jnp.float32))

        fwd = jax.jit(apply)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        x, dy = jax.device_put(x_nhwc), jax.device_put(dy_nhwc)

        def forward() -> object:
            return _wait(fwd(state, x))

        def train() -> object:
            return _wait(grad(state, x, dy))

        def output() -> Array:
            import numpy as np

            return spec.from_layout(np.asarray(fwd(state, x)), "NHWC")

        return forward, train, output

    def groupnorm_module(nnx: Any) -> Any:
        from groupnorm.flax import GroupNorm

        return GroupNorm(
            num_features=spec.channels,
            num_groups=spec.groups,
            epsilon=spec.epsilon,
            activation=spec.activation,
            rngs=nnx.Rngs(0),
            **dtype_kwargs,
        )

    def flax_module(nnx: Any) -> Any:
        norm = nnx.GroupNorm(
            num_features=spec.channels, num_groups=spec.groups, epsilon=spec.epsilon, rngs=nnx.Rngs(0), **dtype_kwargs
        )
        if spec.activation is None:
            return norm
        act = {"relu": nnx.relu, "silu": nnx.silu, "gelu": lambda t: nnx.gelu(t, approximate=False)}[spec.activation]
        return nnx.Sequential(norm, act)

    def floor_parts() -> Parts:
        import jax

        scale = jax.jit(lambda x: x * 1.0001)
        x = jax.device_put(x_nhwc)
        return (lambda: _wait(scale(x))), None, None

    act = f" + nnx.{spec.activation}" if spec.activation else ""
    return [
        guard("groupnorm.flax.GroupNorm", "groupnorm", "", "NHWC", lambda: parts(groupnorm_module)),
        guard(f"flax.nnx.GroupNorm{act}", "peer", "", "NHWC", lambda: parts(flax_module)),
        guard("x * s (jax.jit)", "floor", "", "NHWC", floor_parts),
    ]


def configure(threads: int) -> None:
    """Threads are set through ``XLA_FLAGS`` before JAX starts (see ``groupnorm.bench._runner``)."""
