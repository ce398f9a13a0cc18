"""The channel view of an input, shared by the NumPy and JAX backends (framework-free).

Neighbouring input axes of the same kind (kept, reduced) are merged and the channel axis stands alone,
so NHWC becomes ``(N, H*W, C)`` and NCHW ``(N, C, H*W)``. Statistics are then per-channel reductions over
whole (usually contiguous) axes, summed over a group's few channels afterwards on the small per-channel
result, and elementwise work broadcasts per-channel coefficients along the channel axis: both are what
NumPy's loops and XLA's CPU code generator do fastest, in either layout.

Per-group values have the view's shape with the reduced axes set to 1 and the channel axis to the
number of groups (:meth:`ChannelView.group_shape`); per-channel ones the same with all ``C`` channels
(:meth:`ChannelView.channel_shape`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache, reduce
from typing import Any

from groupnorm import _numerics
from groupnorm._plan import Plan

__all__ = ["ChannelView", "channel_view"]


@dataclass(frozen=True)
class ChannelView:
    """How a plan's input is viewed: runs of like axes merged, the channels alone."""

    runs: tuple[tuple[int, int], ...]
    """Runs ``(start, stop)`` of input axes merged into one axis of the view."""
    channel: int
    """The view axis of the channels."""
    reduced: tuple[int, ...]
    """The view axes statistics run over (besides the channels of a group)."""
    groups: int
    group_channels: int

    @property
    def rank(self) -> int:
        return len(self.runs)

    def shape(self, dims: Sequence[Any]) -> tuple[Any, ...]:
        """The view's shape for the input's shape ``dims`` (ints or a framework's scalars)."""
        return tuple(reduce(operator.mul, dims[start:stop], 1) for start, stop in self.runs)

    def group_shape(self, view: Sequence[Any]) -> tuple[Any, ...]:
        """Shape of per-group values for a view of shape ``view``."""
        return tuple(self.groups if a == self.channel else 1 if a in self.reduced else d for a, d in enumerate(view))

    def channel_shape(self, view: Sequence[Any]) -> tuple[Any, ...]:
        """Shape of per-(kept index, channel) values for a view of shape ``view``."""
        return tuple(1 if a in self.reduced else d for a, d in enumerate(view))

    def param_shape(self) -> tuple[int, ...]:
        """Where a ``[C]`` parameter reshapes to broadcast against the view."""
        return tuple(self.groups * self.group_channels if a == self.channel else 1 for a in range(self.rank))

    def split(self, shape: Sequence[Any]) -> tuple[Any, ...]:
        """``shape`` (of the view's rank) with its channel axis split into ``(groups, channels in group)``:
        a per-channel array reshaped so, summed over axis ``channel + 1``, gives the per-group sums."""
        c = self.channel
        return (*shape[:c], self.groups, shape[c] // self.groups, *shape[c + 1 :])

    def corner(self, view: Sequence[int]) -> _numerics.Corner:
        """The corner (:func:`groupnorm._numerics.corner`) of the view's reduced axes."""
        return _numerics.corner([int(view[a]) for a in self.reduced])

    def corner_index(self, view: Sequence[int]) -> tuple[slice, ...]:
        """An index of the view that selects the box holding every group's corner."""
        spot = self.corner(view)
        index = [slice(None)] * self.rank
        for a, b in zip(self.reduced, spot.box, strict=True):
            index[a] = slice(0, b)
        return tuple(index)

    def first_index(self) -> tuple[slice, ...]:
        """An index of the corner's box that selects each group's first element: position 0 of every
        reduced axis, the group's first channel (the result has the per-group shape)."""
        index = [slice(None)] * self.rank
        for a in self.reduced:
            index[a] = slice(0, 1)
        index[self.channel] = slice(0, None, self.group_channels)
        return tuple(index)

    def corner_mask(self, view: Sequence[int]) -> tuple[tuple[int, ...], list[bool]] | None:
        """Where the box is larger than the corner: the mask's shape (broadcasting against the box) and
        its values, row-major; ``None`` where every element of the box is in the corner."""
        spot = self.corner(view)
        if spot.exact:
            return None
        shape = [1] * self.rank
        for a, b in zip(self.reduced, spot.box, strict=True):
            shape[a] = b
        return tuple(shape), [i < spot.size for i in range(math.prod(spot.box))]


@lru_cache(maxsize=512)
def channel_view(plan: Plan) -> ChannelView:
    """The :class:`ChannelView` of a plan."""
    kinds = ["r" if a in plan.reduction_axes else "k" for a in range(plan.rank)]
    kinds[plan.channels_axis] = "c"
    runs: list[tuple[int, int]] = []
    for a, kind in enumerate(kinds):
        if runs and kind != "c" and kinds[runs[-1][0]] == kind:
            runs[-1] = (runs[-1][0], a + 1)
        else:
            runs.append((a, a + 1))
    channel = next(i for i, (start, _) in enumerate(runs) if kinds[start] == "c")
    reduced = tuple(i for i, (start, _) in enumerate(runs) if kinds[start] == "r")
    return ChannelView(tuple(runs), channel, reduced, plan.groups, plan.group_channels)
