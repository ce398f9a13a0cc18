"""Statistics across devices, on 2 host CPU devices: an input sharded along a reduction axis gets the
unsharded output and gradients under ``shard_map`` and ``pmap`` (with ``axis_name``), and under ``jit``
of a ``jax.sharding``-sharded input (where XLA inserts the collectives).

The device count must be set before JAX starts, so the checks run in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import groupnorm
    import groupnorm.numpy as gnp
    import groupnorm.flax as gflax
    from support import hard_data, reference_group_norm

    assert jax.device_count() == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("d",))
    close = np.testing.assert_allclose

    # NHWC, group mean 1e4 x its spread, sharded along H (a reduction axis).
    x_np = hard_data((2, 8, 6, 8), -1, 1e4)
    x = jnp.asarray(x_np)
    rng = np.random.default_rng(1)
    g, b = (jnp.asarray(rng.normal(1, 0.3, 8), jnp.float32), jnp.asarray(rng.normal(0, 0.3, 8), jnp.float32))
    ct = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def whole(x, g, b, **kw):
        return groupnorm.group_norm(x, 4, gamma=g, beta=b, activation_fn="silu", **kw)

    def local(x, g, b, **kw):
        return gflax.group_norm(x, 4, gamma=g, beta=b, activation_fn="silu", axis_name="d", **kw)

    def loss(fn):
        return lambda x, g, b: jnp.sum(fn(x, g, b) * ct)

    want = whole(x, g, b)
    want_grads = jax.grad(loss(whole), argnums=(0, 1, 2))(x, g, b)
    ref = reference_group_norm(x_np, 4, gamma=np.asarray(g), beta=np.asarray(b), activation="silu")
    ref_grads = gnp.vjp(x_np.astype(np.float64), np.asarray(ct, np.float64), 4,
                        gamma=np.asarray(g, np.float64), beta=np.asarray(b, np.float64), activation_fn="silu")

    for mcz in (False, True):
        sharded = jax.shard_map(lambda x, g, b: local(x, g, b, mean_close_to_zero=mcz), mesh=mesh,
                                in_specs=(P(None, "d"), P(), P()), out_specs=P(None, "d"))
        y = jax.jit(sharded)(x, g, b)
        if mcz:  # one-pass sums: finite, and exact on data with a small mean
            assert bool(jnp.all(jnp.isfinite(y)))
            small = jnp.asarray(hard_data((2, 8, 6, 8), -1, 0.0))
            close(np.asarray(jax.jit(sharded)(small, g, b)), np.asarray(whole(small, g, b)), atol=1e-5)
            continue
        assert np.max(np.abs(np.asarray(y, np.float64) - ref)) <= 1e-5
        close(np.asarray(y), np.asarray(want), atol=2e-6)
        grads = jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2)))(x, g, b)
        for got, w, r in zip(grads, want_grads, ref_grads, strict=True):
            close(np.asarray(got), np.asarray(w), rtol=1e-4, atol=1e-4 * float(np.max(np.abs(r))))
            close(np.asarray(got), r, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(r))))

    # pmap, with axis_index_groups: one group of both devices is the whole; singletons are per shard.
    shards = jnp.stack([x[:, :4], x[:, 4:]])
    for groups, expect in (([[0, 1]], want), ([[0], [1]], jnp.concatenate([whole(x[:, :4], g, b),
                                                                            whole(x[:, 4:], g, b)], axis=1))):
        pm = jax.pmap(lambda x: local(x, g, b, axis_index_groups=groups), axis_name="d")
        close(np.asarray(jnp.concatenate(list(pm(shards)), axis=1)), np.asarray(expect), atol=2e-6)

    # jit over inputs sharded with jax.sharding: along the batch, and along a reduction axis.
    for spec in (P("d"), P(None, "d")):
        xs = jax.device_put(x, NamedSharding(mesh, spec))
        y = jax.jit(whole)(xs, g, b)
        close(np.asarray(y), np.asarray(want), atol=2e-6)
        grads = jax.jit(jax.grad(loss(whole), argnums=(0, 1, 2)))(xs, g, b)
        for got, w in zip(grads, want_grads, strict=True):
            close(np.asarray(got), np.asarray(w), rtol=1e-4, atol=1e-4 * float(np.max(np.abs(w))))

    # the Flax NNX layer with axis_name under shard_map
    layer = gflax.GroupNorm(8, 4, axis_name="d", rngs=nnx.Rngs(0))
    plain = gflax.GroupNorm(8, 4, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    run = jax.shard_map(lambda s, x: nnx.merge(graphdef, s)(x), mesh=mesh,
                        in_specs=(P(), P(None, "d")), out_specs=P(None, "d"))
    close(np.asarray(jax.jit(run)(state, x)), np.asarray(plain(x)), atol=2e-6)
    print("ALL OK")
    """
)


def test_statistics_across_two_host_devices() -> None:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_NUM_CPU_DEVICES"] = "2"
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL OK" in proc.stdout
