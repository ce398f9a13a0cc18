"""GPU benchmark: groupnorm's Triton forward pass (GroupNorm(32) + SiLU fused) against ``torch.nn.GroupNorm``
followed by ``F.silu`` in eager mode and against ``torch.compile`` of the same two, on the shapes of diffusion
UNets and VAEs (image and video), in float16 and bfloat16, in contiguous NCHW and channels-last memory.

Times are medians over rounds of CUDA-event timings, each round timing a few back-to-back calls of every
candidate in turn (after a warm-up, which also compiles). The ratios are groupnorm's time over the peer's
(below 1: groupnorm is faster), with their geometric means over all configurations.

Run it with ``python -m groupnorm.bench.fw_torch_cuda`` (``--help`` for the options) on a machine with a CUDA
device and Triton; everything but :func:`run` and :func:`main`'s timing works without one.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["SHAPES", "Config", "Result", "configs", "geomean", "main", "run", "summary", "table"]

#: (N, C, H, W) and (N, C, T, H, W): SD UNet blocks, a SD VAE decoder block at 512 and 1024 px, a video VAE
SHAPES: tuple[tuple[int, ...], ...] = (
    (2, 320, 64, 64),
    (2, 1280, 8, 8),
    (1, 512, 128, 128),
    (1, 128, 512, 512),
    (1, 128, 20, 256, 256),
)
DTYPES = ("float16", "bfloat16")
LAYOUTS = ("contiguous", "channels_last")
GROUPS = 32
EPSILON = 1e-6
CANDIDATES = ("groupnorm", "eager", "compiled")


@dataclass(frozen=True)
class Config:
    shape: tuple[int, ...]
    dtype: str
    layout: str

    @property
    def label(self) -> str:
        return f"{'x'.join(map(str, self.shape))} {self.dtype} {self.layout}"

    @property
    def bytes_moved(self) -> int:
        """One read of the input and one write of the output, in bytes (2-byte dtypes)."""
        return 2 * 2 * math.prod(self.shape)


@dataclass
class Result:
    config: Config
    times_us: dict[str, float]
    """Median time per call of each candidate, in microseconds."""
    max_difference: float = math.nan
    """Largest |groupnorm - eager| over the output, in units of the output's dtype."""
    ratios: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.ratios:
            self.ratios = ratios(self.times_us)


def configs(
    shapes: Sequence[tuple[int, ...]] = SHAPES, dtypes: Sequence[str] = DTYPES, layouts: Sequence[str] = LAYOUTS
) -> list[Config]:
    """Every (shape, dtype, layout) to measure, in order."""
    return [Config(tuple(s), d, m) for s in shapes for d in dtypes for m in layouts]


def ratios(times_us: dict[str, float]) -> dict[str, float]:
    """groupnorm's time over each peer's (eager, compiled) that was measured."""
    ours = times_us.get("groupnorm")
    if ours is None:
        return {}
    return {peer: ours / t for peer, t in times_us.items() if peer != "groupnorm" and t > 0}


def geomean(values: Sequence[float]) -> float:
    """The geometric mean of positive values (NaN for none)."""
    if not values:
        return math.nan
    if any(v <= 0 for v in values):
        raise ValueError(f"a geometric mean needs positive values, got {list(values)}")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summary(results: Sequence[Result]) -> dict[str, float]:
    """Per peer: the geometric mean of groupnorm's ratios to it."""
    peers = sorted({p for r in results for p in r.ratios})
    return {p: geomean([r.ratios[p] for r in results if p in r.ratios]) for p in peers}


def table(results: Sequence[Result]) -> str:
    """The results as a plain-text table, with the geometric means under it."""
    head = (
        f"{'configuration':<38} {'groupnorm us':>12} {'eager us':>10} {'compiled us':>11} "
        f"{'GB/s':>7} {'/eager':>7} {'/compiled':>9} {'max diff':>9}"
    )
    lines = [head, "-" * len(head)]

    def cell(value: float | None, width: int, digits: int) -> str:
        return f"{'-':>{width}}" if value is None or math.isnan(value) else f"{value:>{width}.{digits}f}"

    for r in results:
        t, q = r.times_us, r.ratios
        ours = t.get("groupnorm")
        gbs = r.config.bytes_moved / (ours * 1e3) if ours else None
        lines.append(
            f"{r.config.label:<38} {cell(ours, 12, 1)} {cell(t.get('eager'), 10, 1)} {cell(t.get('compiled'), 11, 1)} "
            f"{cell(gbs, 7, 0)} {cell(q.get('eager'), 7, 2)} {cell(q.get('compiled'), 9, 2)} "
            f"{cell(r.max_difference, 9, 4)}"
        )
    means = summary(results)
    lines.append("")
    for peer, mean in means.items():
        count = sum(peer in r.ratios for r in results)
        plural = "" if count == 1 else "s"
        lines.append(f"geometric mean of groupnorm / {peer}: {mean:.3f} over {count} configuration{plural}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- on the GPU


def _candidates(config: Config, device: Any, compile_peer: bool) -> tuple[dict[str, Callable[[], Any]], Any]:
    """The callables to time for one configuration, and the input they share."""
    import torch
    import torch.nn.functional as F

    from groupnorm._plan import make_plan
    from groupnorm.backends.torch import _triton

    dtype = getattr(torch, config.dtype)
    rank = len(config.shape)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(config.shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    if config.layout == "channels_last":
        x = x.contiguous(memory_format={4: torch.channels_last, 5: torch.channels_last_3d}[rank])
    channels = config.shape[1]
    norm = torch.nn.GroupNorm(GROUPS, channels, eps=EPSILON).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=gen)
        norm.bias.uniform_(-0.5, 0.5, generator=gen)
    plan = make_plan(
        tuple(config.shape), config.dtype, groups=GROUPS, channels_axis=1, reduction_axes=tuple(range(2, rank)),
        epsilon=EPSILON,
    )  # fmt: skip
    if not (_triton.available(x) and _triton.supports(plan, x)):
        raise RuntimeError(f"groupnorm's Triton kernels do not run on {config.label} here")
    weight, bias = norm.weight.detach(), norm.bias.detach()

    def groupnorm() -> Any:
        return _triton.forward(plan, x, weight, bias, "silu")[0]

    def eager() -> Any:
        return F.silu(norm(x))

    found: dict[str, Callable[[], Any]] = {"groupnorm": groupnorm, "eager": eager}
    if compile_peer:
        torch._dynamo.reset()  # a fresh, static compilation for each configuration (no recompile limit)
        compiled = torch.compile(lambda t: F.silu(norm(t)), dynamic=False)
        found["compiled"] = lambda: compiled(x)
    return found, x


def _time(fns: dict[str, Callable[[], Any]], rounds: int, calls: int, warmup: int) -> dict[str, float]:
    """Median microseconds per call of each callable: ``rounds`` rounds, each timing ``calls`` calls of
    every callable in turn with CUDA events."""
    import torch

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) * 1e3 / calls)
    return {name: statistics.median(values) for name, values in samples.items()}


def run(
    selected: Sequence[Config] | None = None,
    *,
    device: str = "cuda",
    rounds: int = 15,
    calls: int = 10,
    warmup: int = 5,
    compile_peer: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[Result]:
    """Time every configuration on ``device`` (a CUDA device); each is freed before the next."""
    import torch

    if not torch.cuda.is_available() or torch.device(device).type != "cuda":
        raise RuntimeError(f"the GPU benchmark needs a CUDA device (asked for {device!r}; torch sees none)")
    results = []
    for config in configs() if selected is None else selected:
        with torch.no_grad():
            fns, x = _candidates(config, torch.device(device), compile_peer)
            times = _time(fns, rounds, calls, warmup)
            ours, theirs = fns["groupnorm"]().float(), fns["eager"]().float()
            difference = float((ours - theirs).abs().max())
        results.append(Result(config, times, difference))
        if log is not None:
            log(table(results[-1:]).splitlines()[2])
        del fns, x, ours, theirs
        torch.cuda.empty_cache()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m groupnorm.bench.fw_torch_cuda", description=__doc__)
    parser.add_argument("--device", default="cuda", help="a CUDA device (default: cuda)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10, help="back-to-back calls per timing")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile peer")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    try:
        results = run(
            device=args.device, rounds=args.rounds, calls=args.calls, warmup=args.warmup,
            compile_peer=not args.no_compile, log=print,
        )  # fmt: skip
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(table(results))
    if args.json:
        payload = {
            "results": [asdict(r) for r in results],
            "geometric_means": summary(results),
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
