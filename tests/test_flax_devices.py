"""Masked statistics across devices, on 2 host CPU devices: an input and mask sharded along a reduction
axis give, under ``shard_map`` with ``axis_name`` (the NNX layer and the functional form), the output
and gradients of the unsharded input, even where the devices' shards hold different numbers of unmasked
elements.

The device count must be set before JAX starts, so the checks run in a fresh interpreter."""

from __future__ import annotations

import os
import textwrap

from support import run_python

SCRIPT = textwrap.dedent(
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh, PartitionSpec as P

    import groupnorm.flax as gflax
    from masked_support import masked_reference, masked_reference_grads
    from support import Config, hard_data

    assert jax.device_count() == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("d",))
    cfg = Config((2, 8, 6, 8), 4, -1, (1, 2), epsilon=1e-6)
    x_np = hard_data(cfg.shape, -1, 1e3, seed=2)
    mask_np = np.random.default_rng(3).random((2, 8, 6, 1)) < 0.6
    mask_np[:, :4] &= np.random.default_rng(4).random((2, 4, 6, 1)) < 0.3  # fewer unmasked on device 0
    x, mask = jnp.asarray(x_np), jnp.asarray(mask_np)
    ct = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)

    layer = gflax.GroupNorm(8, 4, axis_name="d", rngs=nnx.Rngs(0))
    g, b = np.asarray(layer.scale[...]), np.asarray(layer.bias[...])

    def local(xx, mm):
        return layer(xx, mask=mm)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "d"), P(None, "d")), out_specs=P(None, "d"))
    y = jax.jit(sharded)(x, mask)
    ref = masked_reference(cfg, x_np, mask_np, g, b)["y"]
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=2e-5)
    dx = jax.jit(jax.grad(lambda xx: jnp.sum(sharded(xx, mask) * ct)))(x)
    want = masked_reference_grads(cfg, x_np, mask_np, np.asarray(ct), g, b)["x"]
    np.testing.assert_allclose(np.asarray(dx), want, rtol=0, atol=1e-4 * np.abs(want).max())
    # the functional form, with parameters and an activation
    g2, b2 = jnp.asarray(g) * 1.5, jnp.asarray(b) + 0.5
    fn = jax.shard_map(
        lambda xx, mm: gflax.group_norm(xx, 4, reduction_axes=(1, 2), gamma=g2, beta=b2, activation_fn="gelu",
                                        mask=mm, axis_name="d"),
        mesh=mesh, in_specs=(P(None, "d"), P(None, "d")), out_specs=P(None, "d"))  # fmt: skip
    cfg_gelu = Config(cfg.shape, 4, -1, (1, 2), epsilon=1e-6, activation="gelu")
    ref = masked_reference(cfg_gelu, x_np, mask_np, g * 1.5, b + 0.5)["y"]
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(x, mask)), ref, rtol=0, atol=2e-5)
    print("masked statistics across devices OK")
    """
)


def test_masked_statistics_across_two_host_devices() -> None:
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    result = run_python("-c", SCRIPT, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "masked statistics across devices OK" in result.stdout
