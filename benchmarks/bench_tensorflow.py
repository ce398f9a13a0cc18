"""Side-by-side speed of groupnorm's TensorFlow paths against their peers, in one process.

Pairs (forward, and forward+backward):
  * keras: ``groupnorm.keras.GroupNormalization`` vs ``keras.layers.GroupNormalization``, each called
    inside ``tf.function`` (TensorFlow Keras backend);
  * tf1: ``groupnorm.tf1.group_norm`` vs tf-slim's ``group_norm`` (the contrib layer), each in a
    ``tf.compat.v1.Session`` with the input held in the graph (a variable). The fetch is the sum of the
    output (of each gradient), the same small extra pass for both sides, so that nothing is pruned.

Runs are interleaved (every round times each contender once, in turn) and the ratio reported is of
medians, so that a shared, noisy machine affects both sides alike.

Usage: python benchmarks/bench_tensorflow.py [--shape 16 64 64 256] [--groups 32] [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from tf_slim.layers import normalization as slim_normalization

import groupnorm.tf1
from groupnorm.keras import GroupNormalization

v1 = tf.compat.v1


def keras_pair(x_val: np.ndarray, groups: int, backward: bool) -> dict[str, Callable[[], object]]:
    x = tf.constant(x_val)
    fns = {}
    for name, cls in (("groupnorm", GroupNormalization), ("peer", keras.layers.GroupNormalization)):
        layer = cls(groups=groups, epsilon=1e-6)
        layer.build(x.shape)

        def fwd(t: tf.Tensor, layer: keras.layers.Layer = layer) -> tf.Tensor:
            return layer(t)

        def fwd_bwd(t: tf.Tensor, layer: keras.layers.Layer = layer) -> list[tf.Tensor]:
            with tf.GradientTape() as tape:
                tape.watch(t)
                y = layer(t)
            return tape.gradient(y, [t, *layer.trainable_variables], output_gradients=t)  # type: ignore[no-any-return]

        fn = tf.function(fwd_bwd if backward else fwd)
        fn(x)  # trace and compile outside the timing
        fns[name] = lambda fn=fn: fn(x)
    return fns


def tf1_pair(x_val: np.ndarray, groups: int, backward: bool) -> dict[str, Callable[[], object]]:
    fns = {}
    for name, layer in (("groupnorm", groupnorm.tf1.group_norm), ("peer", slim_normalization.group_norm)):
        graph = tf.Graph()
        with graph.as_default():
            x = v1.get_variable("x", initializer=tf.constant(x_val), trainable=False)
            xt = tf.convert_to_tensor(x)
            y = layer(xt, groups=groups)
            if backward:
                params = v1.trainable_variables()
                # fetch a sum of each gradient: a bare control dependency would let Grappler prune them
                fetch = [tf.reduce_sum(g) for g in v1.gradients(y, [xt, *params], grad_ys=xt)]
            else:
                fetch = tf.reduce_sum(y)
            sess = v1.Session(graph=graph)
            sess.run(v1.global_variables_initializer())
        sess.run(fetch)
        fns[name] = lambda sess=sess, fetch=fetch: sess.run(fetch)
    return fns


def measure(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[16, 64, 64, 256])
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--only", choices=["keras", "tf1"], nargs="*", default=["keras", "tf1"])
    args = parser.parse_args()
    x_val = np.random.default_rng(0).normal(1.0, 2.0, args.shape).astype(np.float32)
    print(f"shape {tuple(args.shape)} float32, {args.groups} groups, {args.rounds} interleaved rounds, medians")
    for pair_name, pair in (("keras", keras_pair), ("tf1", tf1_pair)):
        if pair_name not in args.only:
            continue
        for backward in (False, True):
            med = measure(pair(x_val, args.groups, backward), args.rounds)
            what = "forward+backward" if backward else "forward"
            print(
                f"{pair_name:5s} {what:16s} groupnorm {med['groupnorm'] * 1e3:8.1f} ms   "
                f"peer {med['peer'] * 1e3:8.1f} ms   ratio {med['groupnorm'] / med['peer']:.3f}"
            )


if __name__ == "__main__":
    main()
