"""Side-by-side timing of groupnorm.flax.GroupNorm against flax.nnx.GroupNorm, in one process.

Both layers run jit-compiled on the same input, interleaved call by call; the figure is the ratio of
median times (groupnorm / Flax), so the shared machine's noise hits both alike. Usage:

    PYTHONPATH=src .venv/bin/python docs/jax_bench.py [--shape 16,64,64,256] [--groups 32] [--repeats 31]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import groupnorm.flax


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="16,64,64,256", help="NHWC input shape")
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=31)
    args = parser.parse_args()
    shape = tuple(int(d) for d in args.shape.split(","))
    channels = shape[-1]
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape, np.float32))
    ct = jnp.asarray(np.random.default_rng(1).standard_normal(shape, np.float32))

    calls: dict[str, dict[str, Callable[[], Any]]] = {"forward": {}, "forward+backward": {}}
    for name, cls in (("flax.nnx.GroupNorm", nnx.GroupNorm), ("groupnorm.flax.GroupNorm", groupnorm.flax.GroupNorm)):
        graphdef, state = nnx.split(cls(channels, args.groups, rngs=nnx.Rngs(0)))

        def forward(state: Any, x: jax.Array, graphdef: Any = graphdef) -> jax.Array:
            return nnx.merge(graphdef, state)(x)  # type: ignore[no-any-return]

        def loss(state: Any, x: jax.Array, ct: jax.Array, forward: Any = forward) -> jax.Array:
            return jnp.sum(forward(state, x) * ct)

        fwd = jax.jit(forward)
        both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        calls["forward"][name] = lambda fwd=fwd, state=state: fwd(state, x)
        calls["forward+backward"][name] = lambda both=both, state=state: both(state, x, ct)

    print(
        f"input {shape} float32 NHWC, {args.groups} groups, jit; {jax.devices()[0].device_kind}, "
        f"{args.repeats} interleaved repeats, medians"
    )
    for mode, fns in calls.items():
        for fn in fns.values():  # compile and warm up
            _timed(fn)
            _timed(fn)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, fn in fns.items():
                times[k].append(_timed(fn))
        med = {k: float(np.median(v)) for k, v in times.items()}
        theirs, ours = med["flax.nnx.GroupNorm"], med["groupnorm.flax.GroupNorm"]
        print(f"{mode:>17}: flax {theirs * 1e3:7.1f} ms  groupnorm {ours * 1e3:7.1f} ms  ratio {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
