"""Checks of groupnorm.keras.GroupNormalization on one Keras backend, run in its own process (Keras reads
KERAS_BACKEND at import) by test_keras_backends.py: ``python keras_backend_check.py BACKEND [--no-checks]
[--upstream FILE]``. ``--upstream`` then runs Keras's own GroupNormalization test file with groupnorm's
class swapped in (see upstream_check.py) and prints its result as a line ``UPSTREAM {json}``."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ["KERAS_BACKEND"] = sys.argv[1]

import keras
import numpy as np

import groupnorm.numpy as gnp
from groupnorm.keras import GroupNormalization
from masked_support import masked_reference, masked_reference_grads
from support import Config, hard_data, reference_group_norm

BACKEND = sys.argv[1]
assert keras.backend.backend() == BACKEND, keras.backend.backend()


def numpy(t: object) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(t), np.float64)


def forward_and_input_grad(
    layer: keras.layers.Layer, x: np.ndarray, cot: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """layer(x, mask) and d sum(layer(x, mask) * cot) / dx with the backend's own autodiff (JAX: under jit)."""
    kwargs = {} if mask is None else {"mask": mask}
    if BACKEND == "jax":
        import jax

        values = [v.value for v in layer.trainable_variables]

        def apply(xx: object) -> object:
            return layer.stateless_call(values, [], xx, **kwargs)[0]

        def both(xx: object) -> tuple[object, object]:
            return apply(xx), jax.grad(lambda z: (apply(z) * cot).sum())(xx)

        y, g = jax.jit(both)(x)
        return numpy(y), np.asarray(g, np.float64)
    import torch

    xt = torch.tensor(x, requires_grad=True)
    y = layer(xt, **({} if mask is None else {"mask": torch.as_tensor(mask)}))
    (y * torch.tensor(cot)).sum().backward()
    assert xt.grad is not None
    return numpy(y.detach()), xt.grad.numpy().astype(np.float64)


def check_values_and_gradients() -> None:
    cases = [
        ((2, 4, 5, 8), {"groups": 4}, -1, (1, 2), None),
        ((2, 8, 3, 3), {"groups": 2, "axis": 1, "activation": "silu"}, 1, (2, 3), "silu"),
        ((2, 3, 4, 4, 6), {"groups": 3, "reduction_axes": (-3, -2), "activation": "gelu"}, -1, (-3, -2), "gelu"),
        ((3, 12), {"groups": 3, "mean_close_to_zero": True, "activation": "relu"}, -1, (), "relu"),
    ]
    for shape, kwargs, axis, axes, activation in cases:
        layer = GroupNormalization(
            epsilon=1e-5, gamma_initializer="random_normal", beta_initializer="random_normal", **kwargs
        )
        x = hard_data(shape, axis, 2.0)
        layer.build(shape)
        cot = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        y, got = forward_and_input_grad(layer, x, cot)
        gamma, beta = numpy(layer.gamma), numpy(layer.beta)
        ref = reference_group_norm(x, kwargs["groups"], axis, axes, gamma, beta, 1e-5, activation)
        assert np.abs(y - ref).max() < 2e-5, (shape, kwargs)
        want = gnp.vjp(
            x.astype(np.float64), cot.astype(np.float64), kwargs["groups"], axis, axes,
            gamma=gamma, beta=beta, epsilon=1e-5, activation_fn=activation,
            mean_close_to_zero=kwargs.get("mean_close_to_zero", False),
        ).inputs  # fmt: skip
        assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max()), (shape, kwargs)


def check_masks_values_and_gradients() -> None:
    cases = [
        ((2, 4, 5, 8), {"groups": 4}, (2, 4, 5, 8), None, (1, 2)),
        ((3, 6, 8), {"groups": 2, "activation": "silu"}, (3, 6), -1, (1,)),  # Keras's mask of timesteps
        ((2, 8, 6), {"groups": 4, "axis": 1}, (2, 6), 1, (2,)),
    ]
    for shape, kwargs, mask_shape, insert, axes in cases:
        layer = GroupNormalization(
            epsilon=1e-5, gamma_initializer="random_normal", beta_initializer="random_normal", **kwargs
        )
        layer.build(shape)
        x = hard_data(shape, kwargs.get("axis", -1), 1e3)
        mask = np.random.default_rng(1).random(mask_shape) < 0.6
        cot = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
        y, got = forward_and_input_grad(layer, x, cot, mask)
        full = mask if insert is None else np.expand_dims(mask, insert)
        cfg = Config(shape, kwargs["groups"], kwargs.get("axis", -1), axes, epsilon=1e-5,
                     activation=kwargs.get("activation"))  # fmt: skip
        gamma, beta = numpy(layer.gamma), numpy(layer.beta)
        assert np.abs(y - masked_reference(cfg, x, full, gamma, beta)["y"]).max() < 2e-5, (shape, kwargs)
        want = masked_reference_grads(cfg, x, full, cot, gamma, beta)["x"]
        assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max()), (shape, kwargs)


def check_matches_keras_layer() -> None:
    for shape, kwargs in [((2, 4, 5, 8), {"groups": 4}), ((2, 8, 3), {"groups": -1, "axis": 1})]:
        ours, theirs = GroupNormalization(**kwargs), keras.layers.GroupNormalization(**kwargs)
        ours.build(shape)
        theirs.build(shape)
        theirs.set_weights(ours.get_weights())
        x = hard_data(shape, kwargs.get("axis", -1), 0.5)
        assert np.abs(numpy(ours(x)) - numpy(theirs(x))).max() < 2e-5


def check_large_mean() -> None:
    x = hard_data((2, 4, 4, 8), -1, 1e4)
    y = GroupNormalization(groups=4, epsilon=1e-5)(x)
    assert np.abs(numpy(y) - reference_group_norm(x, 4, epsilon=1e-5)).max() <= 1e-5


def check_save_and_load() -> None:
    inputs = keras.Input((4, 4, 8))
    outputs = GroupNormalization(groups=2, activation="relu", gamma_initializer="random_normal")(inputs)
    model = keras.Model(inputs, outputs)
    x = hard_data((2, 4, 4, 8), -1, 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "x.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
    assert np.array_equal(numpy(loaded(x)), numpy(model(x)))


def check_mixed_float16() -> None:
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = GroupNormalization(groups=4, epsilon=1e-5)
        x = hard_data((2, 4, 4, 8), -1, 3.0, std=400.0)
        x16 = keras.ops.cast(x, "float16")
        y = layer(x16)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    ref = reference_group_norm(numpy(x16), 4, epsilon=1e-5)
    out = numpy(y)
    assert np.isfinite(out).all()
    assert np.abs(out - ref).max() < 5e-3


if __name__ == "__main__":
    if "--no-checks" not in sys.argv:
        check_values_and_gradients()
        check_masks_values_and_gradients()
        check_matches_keras_layer()
        check_large_mean()
        check_save_and_load()
        check_mixed_float16()
        print(f"groupnorm.keras OK on {BACKEND}")
    if "--upstream" in sys.argv:  # last: it swaps Keras's class for groupnorm's in this process
        import json

        from upstream_check import run_suite

        upstream = sys.argv[sys.argv.index("--upstream") + 1]
        print("UPSTREAM " + json.dumps({"keras": run_suite("keras", upstream)}))
