"""Group normalization whose statistics run over the unmasked elements only: one statement for every
array library.

A boolean ``mask`` that broadcasts to the input's shape marks the elements the statistics see: each
group's mean and variance are those of its elements where ``mask`` is true. Every element, masked or
not, is then normalized with its group's statistics (Flax's semantics: the masked ones are not zeroed,
and whatever value they hold, even NaN, never reaches the statistics). A group with no unmasked element
has no statistics; its normalized values are zero, so its outputs are ``beta`` (zero without ``beta``),
passed through the activation, and its input gets no gradient.

Numerics, as for unmasked input: statistics accumulate in float32 (float64 for float64 input), around
a shift ``K`` taken from the unmasked elements (their mean, from a first pass), so that a mean large
against the spread costs no precision; the output is formed from ``x - K``. The sums run over the input
scaled by a power of two per group (from the group's largest unmasked ``|x|``, scaling down only), so
they stay in range for any finite input. ``mean_close_to_zero=True`` skips the first pass (``K = 0``).

The computation is written once, here, over a small set of array operations (:class:`ArrayOps`), and
each library supplies them with a few lines (:func:`ops_for`: NumPy, PyTorch, JAX, TensorFlow, and
``keras.ops`` for every Keras backend). Each operation is differentiable in its library, so gradients
come from the library's own autodiff; ``import groupnorm._masked`` imports no framework.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from functools import cache, lru_cache
from typing import Any, Protocol

from groupnorm._plan import Activation, Plan, check_mask

__all__ = ["ArrayOps", "execute", "masked_group_norm", "ops_for", "prepare_mask"]


class ArrayOps(Protocol):
    """The array operations :func:`masked_group_norm` needs, for one library. ``work`` is a dtype name
    (``"float32"`` or ``"float64"``); reductions keep the reduced axes (size 1)."""

    def as_mask(self, mask: Any, like: Any) -> Any:
        """``mask`` as this library's array, where ``like`` (the input) lives."""

    def static_shape(self, a: Any) -> tuple[int | None, ...] | None: ...

    def dtype_name(self, a: Any) -> str: ...

    def dims(self, a: Any) -> tuple[Any, ...]:
        """The run-time shape: ints where static, the library's scalars where not."""

    def reshape(self, a: Any, shape: tuple[Any, ...]) -> Any: ...

    def broadcast_to(self, a: Any, shape: tuple[Any, ...]) -> Any: ...

    def cast(self, a: Any, work: str) -> Any: ...

    def cast_like(self, a: Any, like: Any) -> Any:
        """``a`` in ``like``'s dtype."""

    def keep(self, cond: Any, a: Any) -> Any:
        """``a`` where ``cond``, zero elsewhere (``cond`` broadcasts against ``a``)."""

    def sum(self, a: Any, axes: tuple[int, ...]) -> Any: ...

    def max(self, a: Any, axes: tuple[int, ...]) -> Any: ...

    def abs(self, a: Any) -> Any: ...

    def maximum(self, a: Any, b: float) -> Any: ...

    def rsqrt(self, a: Any) -> Any: ...

    def exponent(self, a: Any, top: int) -> Any:
        """``floor(log2(a))`` clamped to ``[0, top]``, for ``a >= 0`` (0 where ``a < 1``); any error
        of one either way near a power of two is harmless."""

    def pow2(self, e: Any, work: str) -> Any:
        """``2 ** -e`` exactly, for integer-valued ``e`` in ``[0, top]``."""

    def stop_gradient(self, a: Any) -> Any: ...

    def activate(self, name: str, a: Any) -> Any:
        """One of the fusable activations (``"relu"``, ``"silu"``, ``"gelu"`` exact) by name."""


#: Reductions across devices for sharded input: ``(sum, max)`` over the device axis (``jax.lax.psum``
#: and ``pmax``), or None.
Across = tuple[Callable[[Any], Any], Callable[[Any], Any]] | None


def prepare_mask(plan: Plan, mask: Any, like: Any, xp: ArrayOps) -> Any:
    """``mask`` as ``xp``'s boolean array, validated by the plan against the input (see
    :func:`groupnorm._plan.check_mask`)."""
    m = xp.as_mask(mask, like)
    check_mask(plan, xp.static_shape(m), xp.dtype_name(m))
    return m


def masked_group_norm(
    plan: Plan,
    x: Any,
    mask: Any,
    gamma: Any,
    beta: Any,
    activation: Activation,
    xp: ArrayOps,
    *,
    across: Across = None,
) -> Any:
    """Group normalization of ``x`` by ``plan`` with statistics over the elements where ``mask`` is true.

    ``x`` is an array of ``xp``'s library that the plan was made for; ``mask`` a boolean array (or
    anything ``xp`` converts to one) that broadcasts to ``x``'s shape; ``gamma``/``beta`` ``[C]`` arrays
    or None; ``activation`` None, a fusable name or a callable (applied to the output, in ``x``'s
    dtype). The result has ``x``'s shape and dtype. ``across`` sums and maxes over a device axis, for
    input sharded over devices (the statistics are then those of the whole, unsharded input).

    Raises the plan's errors for a mask of the wrong dtype or shape (:func:`~groupnorm._plan.check_mask`).
    """
    m = prepare_mask(plan, mask, x, xp)
    shape = plan.shape
    if all(isinstance(d, int) for d in shape) and math.prod(shape) == 0:  # type: ignore[arg-type]
        return xp.cast_like(xp.reshape(x, xp.dims(x)), x)
    work = "float64" if plan.dtype == "float64" else "float32"
    top = 1022 if work == "float64" else 126
    total, largest = across if across is not None else (_same, _same)

    dims = xp.dims(x)
    split = plan.split_shape(dims)
    axes = plan.split_reduce_axes
    xs = xp.cast(xp.reshape(x, split), work)
    ms = xp.reshape(xp.broadcast_to(m, dims), split)

    count = total(xp.sum(xp.cast(ms, work), axes))
    safe_count = xp.maximum(count, 1.0)
    # Everything the sums see is scaled by unit = 2**-e (exact), e from the largest unmasked |x|.
    biggest = largest(xp.max(xp.keep(ms, xp.abs(xp.stop_gradient(xs))), axes))
    unit = xp.pow2(xp.exponent(biggest, top), work)
    xu = xs * unit
    if plan.mean_close_to_zero:
        shift_u: Any = 0.0
        du = xp.keep(ms, xu)
    else:
        shift_u = total(xp.sum(xp.keep(ms, xu), axes)) / safe_count
        du = xp.keep(ms, xu - shift_u)
    mean_u = total(xp.sum(du, axes)) / safe_count
    var_u = xp.maximum(total(xp.sum(du * du, axes)) / safe_count - mean_u * mean_u, 0.0)
    # epsilon in units of unit**2, kept a normal number (only a zero variance sees it there)
    eps_u = xp.maximum(plan.epsilon * unit * unit, min(plan.epsilon, 2.0 ** -(top + 1)))
    rstd = xp.rsqrt(var_u + eps_u) * unit

    scale = rstd if gamma is None else rstd * xp.reshape(xp.cast(gamma, work), plan.param_shape)
    centered = xs if plan.mean_close_to_zero else xs - shift_u / unit
    normalized = xp.keep(count > 0, (centered - mean_u / unit) * scale)
    y = normalized if beta is None else normalized + xp.reshape(xp.cast(beta, work), plan.param_shape)
    if isinstance(activation, str):
        y = xp.activate(activation, y)
    out = xp.cast_like(xp.reshape(y, dims), x)
    return activation(out) if callable(activation) else out


def _same(a: Any) -> Any:
    return a


def execute(
    plan: Plan,
    x: Any,
    mask: Any,
    gamma: Any,
    beta: Any,
    activation: Activation,
    library: str,
    *,
    across: Across = None,
) -> Any:
    """:func:`masked_group_norm` with the operations of ``library`` (see :func:`ops_for`); on JAX,
    compiled once per plan and activation (inlined into an enclosing ``jit``)."""
    xp = ops_for(library)
    if library == "jax" and across is None and _hashable(activation):
        return _jax_compiled(plan, activation)(x, xp.as_mask(mask, x), gamma, beta)
    return masked_group_norm(plan, x, mask, gamma, beta, activation, xp, across=across)


def _hashable(value: object) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


@lru_cache(maxsize=256)
def _jax_compiled(plan: Plan, activation: Activation) -> Callable[[Any, Any, Any, Any], Any]:
    jax = importlib.import_module("jax")
    xp = ops_for("jax")

    def run(x: Any, mask: Any, gamma: Any, beta: Any) -> Any:
        return masked_group_norm(plan, x, mask, gamma, beta, activation, xp)

    return jax.jit(run)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------------
# The libraries' operations. Each class imports its library when made (by ops_for), not before.


class _NumPyOps:
    def __init__(self) -> None:
        self.np = importlib.import_module("numpy")

    def as_mask(self, mask: Any, like: Any) -> Any:
        return self.np.asarray(mask)

    def static_shape(self, a: Any) -> tuple[int | None, ...] | None:
        return tuple(a.shape)

    def dtype_name(self, a: Any) -> str:
        return str(a.dtype.name)

    def dims(self, a: Any) -> tuple[Any, ...]:
        return tuple(a.shape)

    def reshape(self, a: Any, shape: tuple[Any, ...]) -> Any:
        return self.np.reshape(a, shape)

    def broadcast_to(self, a: Any, shape: tuple[Any, ...]) -> Any:
        return self.np.broadcast_to(a, shape)

    def cast(self, a: Any, work: str) -> Any:
        return self.np.asarray(a).astype(work)

    def cast_like(self, a: Any, like: Any) -> Any:
        return a.astype(like.dtype)

    def keep(self, cond: Any, a: Any) -> Any:
        return self.np.where(cond, a, self.np.zeros((), a.dtype))

    def sum(self, a: Any, axes: tuple[int, ...]) -> Any:
        return self.np.sum(a, axis=axes, keepdims=True)

    def max(self, a: Any, axes: tuple[int, ...]) -> Any:
        return self.np.max(a, axis=axes, keepdims=True)

    def abs(self, a: Any) -> Any:
        return self.np.abs(a)

    def maximum(self, a: Any, b: float) -> Any:
        return self.np.maximum(a, self.np.asarray(b, a.dtype))

    def rsqrt(self, a: Any) -> Any:
        with self.np.errstate(divide="ignore"):
            return 1 / self.np.sqrt(a)

    def exponent(self, a: Any, top: int) -> Any:
        return self.np.clip(self.np.frexp(a)[1] - 1, 0, top)

    def pow2(self, e: Any, work: str) -> Any:
        return self.np.ldexp(self.np.ones((), work), -self.np.asarray(e).astype(self.np.int32))

    def stop_gradient(self, a: Any) -> Any:
        return a

    def activate(self, name: str, a: Any) -> Any:
        np = self.np
        if name == "relu":
            return np.maximum(a, 0)
        if name == "silu":
            with np.errstate(over="ignore"):
                return a / (1 + np.exp(-a))
        erf = np.vectorize(math.erf, otypes=[a.dtype])
        return 0.5 * a * (1 + erf(a / math.sqrt(2)))


class _TorchOps:
    def __init__(self) -> None:
        self.torch = importlib.import_module("torch")

    def _dtype(self, work: str) -> Any:
        return getattr(self.torch, work)

    def as_mask(self, mask: Any, like: Any) -> Any:
        return self.torch.as_tensor(mask, device=like.device)

    def static_shape(self, a: Any) -> tuple[int | None, ...] | None:
        return tuple(d if isinstance(d, int) else None for d in a.shape)

    def dtype_name(self, a: Any) -> str:
        return str(a.dtype).removeprefix("torch.")

    def dims(self, a: Any) -> tuple[Any, ...]:
        return tuple(a.shape)

    def reshape(self, a: Any, shape: tuple[Any, ...]) -> Any:
        return a.reshape(shape)

    def broadcast_to(self, a: Any, shape: tuple[Any, ...]) -> Any:
        return a.broadcast_to(shape)

    def cast(self, a: Any, work: str) -> Any:
        return a.to(self._dtype(work))

    def cast_like(self, a: Any, like: Any) -> Any:
        return a.to(like.dtype)

    def keep(self, cond: Any, a: Any) -> Any:
        return self.torch.where(cond, a, self.torch.zeros((), dtype=a.dtype, device=a.device))

    def sum(self, a: Any, axes: tuple[int, ...]) -> Any:
        return a.sum(dim=axes, keepdim=True)

    def max(self, a: Any, axes: tuple[int, ...]) -> Any:
        return a.amax(dim=axes, keepdim=True)

    def abs(self, a: Any) -> Any:
        return a.abs()

    def maximum(self, a: Any, b: float) -> Any:
        return a.clamp_min(b)

    def rsqrt(self, a: Any) -> Any:
        return a.rsqrt()

    def exponent(self, a: Any, top: int) -> Any:
        return (self.torch.frexp(a).exponent - 1).clamp(0, top).to(a.dtype)

    def pow2(self, e: Any, work: str) -> Any:
        # from the bits (exact on every device): the biased exponent of 2**-e, in place
        torch = self.torch
        if work == "float64":
            return ((1023 - e.to(torch.int64)) << 52).view(torch.float64)
        return ((127 - e.to(torch.int32)) << 23).view(torch.float32)

    def stop_gradient(self, a: Any) -> Any:
        return a.detach()

    def activate(self, name: str, a: Any) -> Any:
        functional = self.torch.nn.functional
        if name == "relu":
            return functional.relu(a)
        if name == "silu":
            return functional.silu(a)
        return functional.gelu(a)


class _JaxOps:
    def __init__(self) -> None:
        self.jax = importlib.import_module("jax")
        self.jnp = importlib.import_module("jax.numpy")

    def as_mask(self, mask: Any, like: Any) -> Any:
        return self.jnp.asarray(mask)

    def static_shape(self, a: Any) -> tuple[int | None, ...] | None:
        return tuple(d if isinstance(d, int) else None for d in a.shape)

    def dtype_name(self, a: Any) -> str:
        return str(self.jnp.dtype(a.dtype).name)

    def dims(self, a: Any) -> tuple[Any, ...]:
        return tuple(a.shape)

    def reshape(self, a: Any, shape: tuple[Any, ...]) -> Any:
        return self.jnp.reshape(a, shape)

    def broadcast_to(self, a: Any, shape: tuple[Any, ...]) -> Any:
        return self.jnp.broadcast_to(a, shape)

    def cast(self, a: Any, work: str) -> Any:
        return self.jnp.asarray(a).astype(work)

    def cast_like(self, a: Any, like: Any) -> Any:
        return a.astype(like.dtype)

    def keep(self, cond: Any, a: Any) -> Any:
        return self.jnp.where(cond, a, self.jnp.zeros((), a.dtype))

    def sum(self, a: Any, axes: tuple[int, ...]) -> Any:
        return self.jnp.sum(a, axis=axes, keepdims=True)

    def max(self, a: Any, axes: tuple[int, ...]) -> Any:
        return self.jnp.max(a, axis=axes, keepdims=True)

    def abs(self, a: Any) -> Any:
        return self.jnp.abs(a)

    def maximum(self, a: Any, b: float) -> Any:
        return self.jnp.maximum(a, b)

    def rsqrt(self, a: Any) -> Any:
        return self.jax.lax.rsqrt(a)

    def exponent(self, a: Any, top: int) -> Any:
        return self.jnp.clip(self.jnp.frexp(a)[1] - 1, 0, top)

    def pow2(self, e: Any, work: str) -> Any:
        return self.jnp.ldexp(self.jnp.ones(e.shape, work), -e.astype(self.jnp.int32))

    def stop_gradient(self, a: Any) -> Any:
        return self.jax.lax.stop_gradient(a)

    def activate(self, name: str, a: Any) -> Any:
        nn = self.jax.nn
        if name == "relu":
            return nn.relu(a)
        if name == "silu":
            return nn.silu(a)
        return nn.gelu(a, approximate=False)


class _TensorFlowOps:
    def __init__(self) -> None:
        self.tf = importlib.import_module("tensorflow")

    def as_mask(self, mask: Any, like: Any) -> Any:
        return self.tf.convert_to_tensor(mask)

    def static_shape(self, a: Any) -> tuple[int | None, ...] | None:
        shape = self.tf.TensorShape(a.shape)
        return None if shape.rank is None else tuple(shape.as_list())

    def dtype_name(self, a: Any) -> str:
        return str(self.tf.as_dtype(a.dtype).base_dtype.name)

    def dims(self, a: Any) -> tuple[Any, ...]:
        static = list(a.shape.as_list())
        if all(d is not None for d in static):
            return tuple(static)
        dynamic = self.tf.shape(a)
        return tuple(dynamic[i] if d is None else d for i, d in enumerate(static))

    def reshape(self, a: Any, shape: tuple[Any, ...]) -> Any:
        return self.tf.reshape(a, shape)

    def broadcast_to(self, a: Any, shape: tuple[Any, ...]) -> Any:
        return self.tf.broadcast_to(a, shape)

    def cast(self, a: Any, work: str) -> Any:
        return self.tf.cast(a, work)

    def cast_like(self, a: Any, like: Any) -> Any:
        return self.tf.cast(a, like.dtype)

    def keep(self, cond: Any, a: Any) -> Any:
        return self.tf.where(cond, a, self.tf.zeros((), a.dtype))

    def sum(self, a: Any, axes: tuple[int, ...]) -> Any:
        return self.tf.reduce_sum(a, axis=axes, keepdims=True)

    def max(self, a: Any, axes: tuple[int, ...]) -> Any:
        return self.tf.reduce_max(a, axis=axes, keepdims=True)

    def abs(self, a: Any) -> Any:
        return self.tf.abs(a)

    def maximum(self, a: Any, b: float) -> Any:
        return self.tf.maximum(a, self.tf.constant(b, a.dtype))

    def rsqrt(self, a: Any) -> Any:
        return self.tf.math.rsqrt(a)

    def exponent(self, a: Any, top: int) -> Any:
        tf = self.tf
        e = tf.floor(tf.math.log(tf.maximum(a, tf.ones((), a.dtype))) / math.log(2.0))
        return tf.clip_by_value(e, 0.0, float(top))

    def pow2(self, e: Any, work: str) -> Any:
        # from the bits (exact on every device): the biased exponent of 2**-e, in place
        tf = self.tf
        if work == "float64":
            bits = tf.bitwise.left_shift(1023 - tf.cast(e, tf.int64), tf.constant(52, tf.int64))
            return tf.bitcast(bits, tf.float64)
        return tf.bitcast(tf.bitwise.left_shift(127 - tf.cast(e, tf.int32), 23), tf.float32)

    def stop_gradient(self, a: Any) -> Any:
        return self.tf.stop_gradient(a)

    def activate(self, name: str, a: Any) -> Any:
        nn = self.tf.nn
        if name == "relu":
            return nn.relu(a)
        if name == "silu":
            return nn.silu(a)
        return nn.gelu(a, approximate=False)


class _KerasOps:
    """``keras.ops``: every Keras backend."""

    def __init__(self) -> None:
        self.keras = importlib.import_module("keras")
        self.ops = self.keras.ops

    def as_mask(self, mask: Any, like: Any) -> Any:
        return self.ops.convert_to_tensor(mask)

    def static_shape(self, a: Any) -> tuple[int | None, ...] | None:
        try:
            dims = tuple(a.shape)
        except (TypeError, ValueError):  # a TensorShape of unknown rank
            return None
        return tuple(None if d is None else int(d) for d in dims)

    def dtype_name(self, a: Any) -> str:
        return str(self.keras.backend.standardize_dtype(a.dtype))

    def dims(self, a: Any) -> tuple[Any, ...]:
        return tuple(self.ops.shape(a))

    def reshape(self, a: Any, shape: tuple[Any, ...]) -> Any:
        return self.ops.reshape(a, shape)

    def broadcast_to(self, a: Any, shape: tuple[Any, ...]) -> Any:
        return self.ops.broadcast_to(a, shape)

    def cast(self, a: Any, work: str) -> Any:
        return self.ops.cast(a, work)

    def cast_like(self, a: Any, like: Any) -> Any:
        return self.ops.cast(a, like.dtype)

    def keep(self, cond: Any, a: Any) -> Any:
        return self.ops.where(cond, a, self.ops.zeros((), a.dtype))

    def sum(self, a: Any, axes: tuple[int, ...]) -> Any:
        return self.ops.sum(a, axis=axes, keepdims=True)

    def max(self, a: Any, axes: tuple[int, ...]) -> Any:
        return self.ops.max(a, axis=axes, keepdims=True)

    def abs(self, a: Any) -> Any:
        return self.ops.abs(a)

    def maximum(self, a: Any, b: float) -> Any:
        return self.ops.maximum(a, self.ops.cast(b, a.dtype))

    def rsqrt(self, a: Any) -> Any:
        return self.ops.rsqrt(a)

    def exponent(self, a: Any, top: int) -> Any:
        ops = self.ops
        e = ops.floor(ops.log2(ops.maximum(a, ops.ones((), a.dtype))))
        return ops.clip(e, 0.0, float(top))

    def pow2(self, e: Any, work: str) -> Any:
        # from the bits (exact on every backend): the biased exponent of 2**-e, in place
        ops = self.ops
        if work == "float64":
            bits = ops.left_shift(1023 - ops.cast(e, "int64"), 52)
            return ops.view(bits, "float64")
        return ops.view(ops.left_shift(127 - ops.cast(e, "int32"), 23), "float32")

    def stop_gradient(self, a: Any) -> Any:
        return self.ops.stop_gradient(a)

    def activate(self, name: str, a: Any) -> Any:
        ops = self.ops
        if name == "relu":
            return ops.relu(a)
        if name == "silu":
            return ops.silu(a)
        return ops.gelu(a, approximate=False)


_OPS: dict[str, Callable[[], ArrayOps]] = {
    "numpy": _NumPyOps,
    "torch": _TorchOps,
    "jax": _JaxOps,
    "tensorflow": _TensorFlowOps,
    "keras": _KerasOps,
}


@cache
def ops_for(library: str) -> ArrayOps:
    """The :class:`ArrayOps` of ``library``: ``"numpy"``, ``"torch"``, ``"jax"``, ``"tensorflow"`` or
    ``"keras"`` (``keras.ops``, for tensors of the current Keras backend)."""
    try:
        make = _OPS[library]
    except KeyError:
        raise ValueError(f"no masked group normalization for {library!r}; known: {', '.join(_OPS)}.") from None
    return make()
