"""What a benchmark measures: the configuration, the candidates and their results."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "DEVICES",
    "FRAMEWORKS",
    "LAYOUTS",
    "MODES",
    "SWEEPS",
    "Candidate",
    "Data",
    "Role",
    "Spec",
    "guard",
    "make_data",
    "reference",
]

Array = NDArray[Any]
Role = Literal["groupnorm", "peer", "floor"]

#: framework name -> module of candidates, in the order they run.
FRAMEWORKS = {
    "numpy": "groupnorm.bench.fw_numpy",
    "torch": "groupnorm.bench.fw_torch",
    "keras": "groupnorm.bench.fw_keras",
    "tf1": "groupnorm.bench.fw_tf1",
    "flax": "groupnorm.bench.fw_flax",
}
LAYOUTS = ("NHWC", "NCHW")
#: where the tensors live; a device other than the CPU runs the framework's ``<module>_<device>`` module
#: (``groupnorm.bench.fw_torch_cuda``), reported as missing where there is none.
DEVICES = ("cpu", "cuda")


def framework_module(framework: str, device: str = "cpu") -> str:
    """The module of ``framework``'s candidates on ``device``."""
    return FRAMEWORKS[framework] if device == "cpu" else f"{FRAMEWORKS[framework]}_{device}"


@dataclass(frozen=True)
class Sweep:
    """The shapes ``--sweep`` measures for one framework, in ``layout`` order."""

    layout: str
    shapes: tuple[tuple[int, ...], ...]


#: The activations of Stable-Diffusion-like UNets and VAEs, (N, C, H, W), from a tiny one to the 64 MiB ones.
_UNET_SHAPES = (
    (2, 32, 8, 8),
    (1, 128, 16, 16),
    (2, 320, 64, 64),
    (2, 640, 32, 32),
    (2, 1280, 16, 16),
    (2, 1280, 8, 8),
    (1, 512, 64, 64),
    (1, 512, 128, 128),
    (1, 256, 256, 256),
    (16, 256, 64, 64),
)

#: framework -> its sweep: the same activations in the layout of the framework's layer (torch: NCHW, run
#: contiguous and channels_last; Flax: NHWC).
SWEEPS = {
    "torch": Sweep("NCHW", _UNET_SHAPES),
    "flax": Sweep("NHWC", tuple((n, h, w, c) for n, c, h, w in _UNET_SHAPES)),
}
#: "forward" times the forward pass; "forward+backward" the forward pass and the gradient of a scalar
#: loss ``sum(y * cotangent)`` with respect to the input and the parameters.
MODES = ("forward", "forward+backward")


@dataclass(frozen=True)
class Spec:
    """One configuration: the input's shape in ``layout`` order, its dtype, and the layer's arguments."""

    shape: tuple[int, ...]
    layout: str = "NHWC"
    dtype: str = "float32"
    groups: int = 32
    epsilon: float = 1e-5
    activation: str | None = None

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def channels_axis(self) -> int:
        """Non-negative channel axis of ``shape``."""
        return 1 if self.layout == "NCHW" else self.rank - 1

    @property
    def channels(self) -> int:
        return self.shape[self.channels_axis]

    @property
    def reduction_axes(self) -> tuple[int, ...]:
        """The spatial axes of ``shape`` (everything but batch and channels)."""
        return tuple(a for a in range(1, self.rank) if a != self.channels_axis)

    def to_layout(self, x: Array, layout: str) -> Array:
        """``x`` (in this spec's layout) in ``layout`` order, as a contiguous array."""
        if layout == self.layout:
            return np.ascontiguousarray(x)
        if layout == "NCHW":  # from NHWC
            return np.ascontiguousarray(np.moveaxis(x, -1, 1))
        return np.ascontiguousarray(np.moveaxis(x, 1, -1))

    def from_layout(self, y: Array, layout: str) -> Array:
        """``y`` in ``layout`` order back in this spec's layout."""
        if layout == self.layout:
            return y
        if layout == "NCHW":
            return np.moveaxis(y, 1, -1)
        return np.moveaxis(y, -1, 1)

    def shape_in(self, layout: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.to_layout(np.empty(self.shape, np.int8), layout).shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def describe(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "layout": self.layout,
            "dtype": self.dtype,
            "groups": self.groups,
            "epsilon": self.epsilon,
            "activation": self.activation,
        }


@dataclass(frozen=True)
class Data:
    """The input and the fixed output cotangent of one configuration, in the spec's layout."""

    spec: Spec
    x: Array
    cotangent: Array


def make_data(
    spec: Spec, *, mean_over_std: float = 0.0, std: float = 1.0, clip: float | None = None, seed: int = 0
) -> Data:
    """Normal data in ``spec.dtype`` whose every channel has mean ``mean_over_std * std`` (+/- 5 %, so that
    groups differ) and spread ``std``; ``clip`` bounds the magnitude (to stay in float16's range)."""
    rng = np.random.default_rng(seed)
    per_channel = [1] * spec.rank
    per_channel[spec.channels_axis] = spec.channels
    means = mean_over_std * std * (1 + 0.05 * rng.standard_normal(per_channel))
    x = means + std * rng.standard_normal(spec.shape)
    if clip is not None:
        x = np.clip(x, -clip, clip)
    cotangent = rng.standard_normal(spec.shape)
    return Data(spec, x.astype(spec.dtype), cotangent.astype(spec.dtype))


_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": lambda y: np.maximum(y, 0.0),
    "silu": lambda y: y / (1.0 + np.exp(-y)),
    "gelu": lambda y: 0.5 * y * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(y / math.sqrt(2.0))),
}


def reference(spec: Spec, x: Array) -> Array:
    """Group normalization of ``x`` (in ``spec``'s layout, gamma = 1, beta = 0) in float64: a two-pass
    mean and variance over each group, written independently of groupnorm's own code."""
    xd = np.asarray(x, dtype=np.float64)
    c = spec.channels_axis
    moved = np.moveaxis(xd, c, 1)  # (N, C, *spatial)
    rows = moved.reshape(moved.shape[0], spec.groups, -1)
    mean = rows.mean(axis=-1, keepdims=True)
    var = np.square(rows - mean).mean(axis=-1, keepdims=True)
    y: Array = np.moveaxis(((rows - mean) / np.sqrt(var + spec.epsilon)).reshape(moved.shape), 1, c)
    if spec.activation is not None:
        with np.errstate(over="ignore"):
            y = _ACTIVATIONS[spec.activation](y)
    return y


@dataclass
class Candidate:
    """One implementation to time, ready to run.

    ``forward`` and ``train`` run one forward pass (respectively forward and backward pass) and wait for
    the result; ``output`` returns the forward result as a NumPy array in the spec's layout.
    """

    name: str
    role: Role
    variant: str = ""
    layout: str = ""
    """What the implementation actually sees, e.g. ``NCHW channels_last``."""
    status: Literal["ok", "missing", "error"] = "ok"
    detail: str = ""
    forward: Callable[[], object] | None = None
    train: Callable[[], object] | None = None
    output: Callable[[], Array] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    secondary: bool = False
    """Another way to call groupnorm on the same input (an NHWC view): left out of ``--sweep``."""


Parts = tuple[Callable[[], object] | None, Callable[[], object] | None, Callable[[], Array] | None]


def guard(
    name: str, role: Role, variant: str, layout: str, factory: Callable[[], Parts], *, secondary: bool = False
) -> Candidate:
    """A candidate built by ``factory``; reported as missing when an import fails and as an error when
    building fails otherwise, so that one broken implementation never stops the others."""
    base = Candidate(name, role, variant, layout, secondary=secondary)
    try:
        forward, train, output = factory()
    except ImportError as e:
        return replace(base, status="missing", detail=f"{type(e).__name__}: {e}")
    except Exception as e:
        return replace(base, status="error", detail=_describe(e))
    return replace(base, forward=forward, train=train, output=output)


def _describe(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return first[:300]


describe_error = _describe
