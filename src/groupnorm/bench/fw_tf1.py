"""TensorFlow 1 graph-mode candidates: ``groupnorm.tf1.group_norm`` against ``tf_slim.group_norm`` (the
layer ``tf.contrib.layers.group_norm`` became), each in its own ``tf.compat.v1`` graph and session. The
input and the cotangent are held in graph variables (fed once), so that neither feeding nor constant
folding enters the timings; each timed call fetches one element of the output (of the input's gradient,
and the parameters' gradients), which needs the whole output computed but copies nothing large. (Running
the gradients as a ``tf.group`` target instead lets Grappler skip work.) The floor is ``x * s`` in the
same kind of graph."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from groupnorm.bench._core import Array, Candidate, Data, Parts, guard

FRAMEWORK = "tf1"


def _activation(name: str | None) -> Any:
    import tensorflow as tf

    if name is None:
        return None
    return {"relu": tf.nn.relu, "silu": tf.nn.silu, "gelu": lambda t: tf.nn.gelu(t, approximate=False)}[name]


def build(data: Data) -> list[Candidate]:
    spec = data.spec
    c = spec.channels_axis - spec.rank
    axes = tuple(a - spec.rank for a in spec.reduction_axes)

    def session(make: Callable[[Any, Any], Any], need_grad: bool) -> Parts:
        import tensorflow as tf

        v1 = tf.compat.v1
        graph = tf.Graph()
        with graph.as_default():
            x_in = v1.placeholder(spec.dtype, spec.shape)
            dy_in = v1.placeholder(spec.dtype, spec.shape)
            x_var = v1.Variable(x_in, trainable=False, name="x")
            dy_var = v1.Variable(dy_in, trainable=False, name="dy")
            x = x_var.read_value()
            y = make(x, tf)
            first = (0,) * spec.rank
            fwd_fetch = y[first]
            train_fetch = None
            if need_grad:
                loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.cast(dy_var.read_value(), tf.float32))
                grads = tf.gradients(loss, [x, *v1.trainable_variables()])
                train_fetch = [grads[0][first], *grads[1:]]
            init = v1.global_variables_initializer()
        config = None
        if _THREADS[0] is not None:
            config = v1.ConfigProto(intra_op_parallelism_threads=_THREADS[0], inter_op_parallelism_threads=_THREADS[0])
        sess = v1.Session(graph=graph, config=config)
        sess.run(init, {x_in: data.x, dy_in: data.cotangent})

        def forward() -> object:
            return sess.run(fwd_fetch)

        def train() -> object:
            return sess.run(train_fetch)

        def output() -> Array:
            return sess.run(y)  # type: ignore[no-any-return]

        return forward, (train if need_grad else None), output

    kwargs: dict[str, Any] = {
        "groups": spec.groups,
        "channels_axis": c,
        "reduction_axes": axes,
        "epsilon": spec.epsilon,
    }

    def groupnorm_parts() -> Parts:
        from groupnorm.tf1 import group_norm

        return session(lambda x, tf: group_norm(x, activation_fn=spec.activation, **kwargs), True)

    def slim_parts() -> Parts:
        import tf_slim

        return session(lambda x, tf: tf_slim.group_norm(x, activation_fn=_activation(spec.activation), **kwargs), True)

    def floor_parts() -> Parts:
        forward, _, _ = session(lambda x, tf: x * tf.constant(1.0001, x.dtype), False)
        return forward, None, None

    act = f" + {spec.activation}" if spec.activation else ""
    return [
        guard("groupnorm.tf1.group_norm", "groupnorm", "", spec.layout, groupnorm_parts),
        guard(f"tf_slim.group_norm{act}", "peer", "", spec.layout, slim_parts),
        guard("x * s (tf.compat.v1 graph)", "floor", "", spec.layout, floor_parts),
    ]


_THREADS: list[int | None] = [None]


def configure(threads: int) -> None:
    _THREADS[0] = threads
