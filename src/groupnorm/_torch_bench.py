"""Side-by-side CPU timing of ``groupnorm.torch.GroupNorm`` against ``torch.nn.GroupNorm``.

Run ``python -m groupnorm._torch_bench [--shape 16 256 64 64] [--groups 32] [--repeats 15]``. Each case
times both layers on the same tensor, alternating between them, and reports the ratio of the medians
(ours / torch's): below 1 is faster.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from groupnorm.torch import GroupNorm


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(ours: Callable[[], object], theirs: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """Median seconds of each, interleaved, and the ratio of the medians."""
    ours()
    theirs()
    a: list[float] = []
    b: list[float] = []
    for i in range(repeats):
        if i % 2:
            a.append(_time(ours))
            b.append(_time(theirs))
        else:
            b.append(_time(theirs))
            a.append(_time(ours))
    ma, mb = statistics.median(a), statistics.median(b)
    return ma, mb, ma / mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs="+", default=[16, 256, 64, 64])
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cases", nargs="*", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = tuple(args.shape)
    channels = shape[1]
    ours, theirs = GroupNorm(args.groups, channels), torch.nn.GroupNorm(args.groups, channels)
    ours_silu = GroupNorm(args.groups, channels, activation="silu")
    x = torch.randn(shape)
    xcl = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape)

    def fwd(m: torch.nn.Module, t: torch.Tensor) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return m(t)

        return run

    def fwd_bwd(m: torch.nn.Module, t: torch.Tensor) -> Callable[[], object]:
        leaf = t.detach().clone().requires_grad_()

        def run() -> object:
            leaf.grad = None
            m.zero_grad()
            m(leaf).backward(dy)
            return leaf.grad

        return run

    def torch_silu(t: torch.Tensor) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return F.silu(theirs(t))

        return run

    cases: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "forward, contiguous": (fwd(ours, x), fwd(theirs, x)),
        "forward, channels_last": (fwd(ours, xcl), fwd(theirs, xcl)),
        "forward+backward, contiguous": (fwd_bwd(ours, x), fwd_bwd(theirs, x)),
        "forward+backward, channels_last": (fwd_bwd(ours, xcl), fwd_bwd(theirs, xcl)),
        "silu fused vs GroupNorm+silu, contiguous": (fwd(ours_silu, x), torch_silu(x)),
    }
    print(f"shape {shape}, {args.groups} groups, float32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, (a, b) in cases.items():
        if args.cases and not any(c in name for c in args.cases):
            continue
        ma, mb, ratio = compare(a, b, args.repeats)
        print(f"{name:45s} groupnorm {ma * 1e3:8.1f} ms   torch {mb * 1e3:8.1f} ms   ratio {ratio:5.2f}")


if __name__ == "__main__":
    main()
