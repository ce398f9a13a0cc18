"""The configurations the Triton kernels are checked on (by triton_interpreter_check.py, in Triton's
interpreter, and by test_torch_triton.py on a GPU), and the tolerances per dtype. Imports no Triton."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DTYPES = ("float32", "float16", "bfloat16")
ACTIVATIONS = (None, "relu", "silu", "gelu")

#: how each case's tensors are laid out in memory (see triton_interpreter_check.make_input)
MEMORY = ("contiguous", "channels_last", "hcw", "strided")

#: passes: "fused" (one program per group, the defaults on these tiny shapes), "split" (the split passes,
#: tiles of 8 elements and many programs, so that groups span several chunks of several tiles each)
PATHS = ("fused", "split")

#: every group's mean, in units of its spread
MEAN_OVER_STD = 1e3


@dataclass(frozen=True)
class Case:
    layout: str
    shape: tuple[int, ...]
    groups: int
    channels_axis: int
    reduction_axes: tuple[int, ...]
    memory: str = "contiguous"
    dtype: str = "float32"
    path: str = "fused"
    activation: str | None = None
    affine: bool = True
    mean_close_to_zero: bool = False
    expanded_cotangent: bool = False
    """The output's gradient as one value broadcast to the input's shape (all strides 0)."""
    needs: tuple[bool, bool, bool] = (True, True, True)

    @property
    def name(self) -> str:
        parts = [self.layout, self.dtype, self.path, self.activation or "none", "affine" if self.affine else "plain"]
        if self.mean_close_to_zero:
            parts.append("mean0")
        if self.expanded_cotangent:
            parts.append("expanded-dy")
        if self.needs != (True, True, True):
            parts.append("needs-" + "".join("xwb"[i] for i, n in enumerate(self.needs) if n))
        return "-".join(parts)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


#: layout name -> (shape, groups, channels axis, reduction axes, memory)
LAYOUTS: dict[str, tuple[tuple[int, ...], int, int, tuple[int, ...], str]] = {
    "nchw": ((2, 8, 4, 5), 4, 1, (2, 3), "contiguous"),
    "nchw-channels-last": ((2, 8, 4, 5), 4, 1, (2, 3), "channels_last"),
    "nhwc": ((2, 4, 5, 8), 4, -1, (1, 2), "contiguous"),
    "ncl": ((2, 6, 7), 3, 1, (2,), "contiguous"),
    "ncthw-per-clip": ((2, 6, 3, 4, 4), 2, 1, (2, 3, 4), "contiguous"),
    "ncthw-per-clip-channels-last": ((2, 6, 3, 4, 4), 2, 1, (2, 3, 4), "channels_last"),
    "ncthw-per-frame": ((2, 6, 3, 4, 4), 2, 1, (3, 4), "contiguous"),
    "ncthw-per-frame-channels-last": ((2, 6, 3, 4, 4), 2, 1, (3, 4), "channels_last"),
    # NCHW held as (N, H, C, W) in memory: the reduced axes are two strided runs
    "nchw-hcw-memory": ((2, 8, 4, 5), 4, 1, (2, 3), "hcw"),
    # every other column of a wider tensor: not dense, so the output is contiguous
    "nchw-strided": ((2, 8, 4, 5), 2, 1, (2, 3), "strided"),
    "chw-no-batch": ((8, 4, 5), 4, 0, (1, 2), "contiguous"),
    "nc-no-reduction": ((3, 12), 3, -1, (), "contiguous"),
}


def _cases() -> list[Case]:
    """Every layout in every dtype on the one-program path, and every layout on the split path (the dtype
    and activation rotating); then every activation on both paths, and the remaining options."""
    cases = []
    for i, (layout, (shape, groups, axis, reduced, memory)) in enumerate(LAYOUTS.items()):
        for j, dtype in enumerate(DTYPES):
            activation = ACTIVATIONS[(i + j) % len(ACTIVATIONS)]
            cases.append(
                Case(layout, shape, groups, axis, reduced, memory, dtype, "fused", activation, (i + j) % 3 != 2)
            )
        dtype, activation = DTYPES[i % len(DTYPES)], ACTIVATIONS[(i + 1) % len(ACTIVATIONS)]
        cases.append(Case(layout, shape, groups, axis, reduced, memory, dtype, "split", activation, i % 2 == 0))
    shape, groups, axis, reduced, memory = LAYOUTS["nchw"]

    def nchw(path: str, dtype: str = "float32", activation: str | None = "silu", **options: Any) -> Case:
        return Case("nchw", shape, groups, axis, reduced, memory, dtype, path, activation, **options)

    for k, path in enumerate(PATHS):
        for i, activation in enumerate(ACTIVATIONS):
            cases.append(nchw(path, activation=activation, affine=(i + k) % 2 == 0))
        cases.append(nchw(path, mean_close_to_zero=True))
        cases.append(nchw(path, "bfloat16", None, mean_close_to_zero=True))
        cases.append(nchw(path, activation="gelu", expanded_cotangent=True))
    for path, needs in (
        ("fused", (True, False, False)),
        ("fused", (False, True, True)),
        ("split", (False, False, True)),
    ):
        cases.append(nchw(path, "float16", "relu", needs=needs))
    return list({case.name: case for case in cases}.values())


CASES = {case.name: case for case in _cases()}

#: per dtype: (absolute, relative) tolerance of the output; gradients: tolerance relative to the largest
#: gradient. float16/bfloat16 results are rounded to 11 or 8 significant bits (Triton's interpreter
#: truncates float32 to bfloat16 rather than rounding, so its error is up to one unit in the last place).
OUTPUT_TOLERANCE = {"float32": (2e-6, 2e-6), "float16": (1e-3, 1.2e-3), "bfloat16": (1e-2, 8.5e-3)}
GRADIENT_TOLERANCE = {"float32": 2e-6, "float16": 1.5e-3, "bfloat16": 1.2e-2}
#: statistics are float32 for every dtype: the mean in units of the group's spread, rstd relative
STATISTICS_TOLERANCE = 2e-6
