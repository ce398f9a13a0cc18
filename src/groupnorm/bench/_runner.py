"""Runs the candidates: interleaved timing rounds for speed, a float64 reference for accuracy."""

from __future__ import annotations

import contextlib
import gc
import importlib
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from groupnorm.bench._core import Candidate, Data, Spec, describe_error, framework_module, make_data, reference

__all__ = [
    "ACCURACY_CASES",
    "AccuracyCase",
    "Progress",
    "Timing",
    "build",
    "rounds_within",
    "run_accuracy",
    "run_speed",
    "time_interleaved",
]

#: ``progress(advance, description)``: called as work is done, for a progress bar.
Progress = Callable[[int, str], None]


def _no_progress(advance: int, description: str) -> None:
    pass


@dataclass
class Timing:
    """Per-call seconds of one candidate: one sample per round, each the mean of ``calls`` calls."""

    samples: list[float] = field(default_factory=list)
    calls: int = 1
    error: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan


def rounds_within(budget_s: float | None, round_s: float, repeats: int, min_repeats: int = 3) -> int:
    """How many timed rounds fit in ``budget_s`` seconds when one round takes ``round_s``: at most
    ``repeats`` and at least ``min_repeats`` (or ``repeats`` if fewer); ``repeats`` with no budget."""
    if budget_s is None:
        return repeats
    fit = math.floor(budget_s / round_s) if round_s > 0 else repeats
    return max(min(min_repeats, repeats), min(repeats, fit))


def time_interleaved(
    fns: Sequence[Callable[[], object]],
    *,
    warmup: int,
    repeats: int,
    min_sample_s: float,
    budget_s: float | None = None,
    progress: Progress = _no_progress,
) -> list[Timing]:
    """Time ``fns`` side by side: ``warmup`` calls of each (the last one also sizes the samples so that
    one takes at least ``min_sample_s``), then ``repeats`` rounds that time every function once, in an
    order that rotates from round to round. With ``budget_s``, fewer rounds where ``repeats`` of them would
    take longer than that (but at least 3). A function that raises is dropped with its error."""
    timings = [Timing() for _ in fns]
    live: list[int] = []
    round_s = 0.0
    for i, fn in enumerate(fns):
        try:
            elapsed = 0.0
            for _ in range(max(1, warmup)):
                start = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - start
            timings[i].calls = max(1, min(10_000, math.ceil(min_sample_s / max(elapsed, 1e-9))))
            round_s += timings[i].calls * elapsed
            live.append(i)
        except Exception as e:
            timings[i].error = describe_error(e)
    progress(1, "warm-up")
    gc.collect()
    rounds = rounds_within(budget_s, round_s, repeats)
    for r in range(rounds):
        shift = r % len(live) if live else 0
        for i in live[shift:] + live[:shift]:
            fn, n = fns[i], timings[i].calls
            if not timings[i].error:
                try:
                    start = time.perf_counter()
                    for _ in range(n):
                        fn()
                    timings[i].samples.append((time.perf_counter() - start) / n)
                except Exception as e:
                    timings[i].error = describe_error(e)
        progress(1, f"round {r + 1}/{rounds}")
    progress(repeats - rounds, f"{rounds} rounds")
    return timings


def set_threads(threads: int | None) -> None:
    """Ask every framework to use ``threads`` threads (``None``: their defaults). JAX takes it only before
    its first computation, TensorFlow's eager runtime only before its first op."""
    if threads is None:
        return
    if threads == 1 and "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    _THREADS[0] = threads


_THREADS: list[int | None] = [None]


def build(framework: str, data: Data, device: str = "cpu") -> list[Candidate]:
    """The candidates of one framework for ``data``; every one reported, present or not."""
    name = framework_module(framework, device)
    try:
        module: Any = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if device == "cpu" or e.name != name:
            raise
        detail = f"no {device} benchmark for {framework} ({name} is not there)"
        return [Candidate(f"{framework} on {device}", "groupnorm", status="missing", detail=detail)]
    if _THREADS[0] is not None:
        with contextlib.suppress(ImportError):
            module.configure(_THREADS[0])
    candidates: list[Candidate] = module.build(data)
    return candidates


def _traffic(mode: str, role: str) -> int:
    """Tensors of the input's size that an ideal implementation reads and writes: forward reads x and
    writes y; the backward pass also reads x and dy and writes dx; a copy reads and writes once."""
    return 2 if role == "floor" or mode == "forward" else 5


def run_speed(
    spec: Spec,
    frameworks: Sequence[str],
    modes: Sequence[str],
    *,
    warmup: int,
    repeats: int,
    min_sample_s: float,
    seed: int = 0,
    mean_over_std: float = 0.0,
    budget_s: float | None = None,
    primary_only: bool = False,
    device: str = "cpu",
    data: Data | None = None,
    progress: Progress = _no_progress,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Time every framework's candidates; returns the JSON rows of ``speed`` and ``comparisons``.
    ``budget_s``: seconds of timed rounds per framework and mode (see :func:`time_interleaved`);
    ``primary_only``: leave out the secondary candidates; ``data``: made from ``spec`` when not given."""
    if data is None:
        data = make_data(spec, mean_over_std=mean_over_std, seed=seed)
    rows: list[dict[str, Any]] = []
    comparisons: list[dict[str, Any]] = []
    for framework in frameworks:
        progress(0, f"{framework}: building")
        candidates = [c for c in build(framework, data, device) if not (primary_only and c.secondary)]
        for mode in modes:
            progress(0, f"{framework} {mode}")
            timed: list[tuple[Candidate, Callable[[], object]]] = []
            for c in candidates:
                fn = c.forward if mode == "forward" or c.role == "floor" else c.train
                if c.status == "ok" and fn is not None:
                    timed.append((c, fn))
            timings = time_interleaved(
                [fn for _, fn in timed],
                warmup=warmup,
                repeats=repeats,
                min_sample_s=min_sample_s,
                budget_s=budget_s,
                progress=_prefixed(progress, f"{framework} {mode}: "),
            )
            by_id = {id(c): t for (c, _), t in zip(timed, timings, strict=True)}
            floor_median = next((by_id[id(c)].median for c, _ in timed if c.role == "floor"), math.nan)
            mode_rows = [_speed_row(framework, mode, c, by_id.get(id(c)), spec, floor_median) for c in candidates]
            rows.extend(mode_rows)
            comparisons.extend(_compare(framework, mode, mode_rows))
        del candidates
        gc.collect()
    return rows, comparisons


def _prefixed(progress: Progress, prefix: str) -> Progress:
    return lambda n, d: progress(n, prefix + d)


def _speed_row(
    framework: str, mode: str, c: Candidate, t: Timing | None, spec: Spec, floor_median: float
) -> dict[str, Any]:
    status, detail = c.status, c.detail
    if status == "ok" and t is None:
        status, detail = "error", f"{c.name} has no {mode} pass"
    elif status == "ok" and t is not None and t.error:
        status, detail = "error", t.error
    ok = status == "ok" and t is not None and bool(t.samples)
    median = t.median if ok and t is not None else None
    traffic = _traffic(mode, c.role)
    floor_time = floor_median * traffic / 2  # a copy moves 2 tensors
    return {
        "framework": framework,
        "candidate": c.name,
        "role": c.role,
        "variant": c.variant,
        "layout": c.layout,
        "mode": mode,
        "status": status,
        "detail": detail,
        "median_s": median,
        "samples_s": list(t.samples) if ok and t is not None else [],
        "calls_per_sample": t.calls if ok and t is not None else None,
        "gb_per_s": (traffic * spec.nbytes / median / 1e9) if median else None,
        "vs_floor": (median / floor_time) if median and math.isfinite(floor_time) else None,
    }


def _compare(framework: str, mode: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """groupnorm median / peer median for every groupnorm and peer of the same variant."""
    out = []
    for g in rows:
        if g["role"] != "groupnorm":
            continue
        for p in rows:
            if p["role"] != "peer" or p["variant"] != g["variant"]:
                continue
            ok = g["median_s"] is not None and p["median_s"] is not None
            out.append(
                {
                    "framework": framework,
                    "variant": g["variant"],
                    "mode": mode,
                    "groupnorm": g["candidate"],
                    "peer": p["candidate"],
                    "groupnorm_median_s": g["median_s"],
                    "peer_median_s": p["median_s"],
                    "ratio": g["median_s"] / p["median_s"] if ok else None,
                }
            )
    return out


@dataclass(frozen=True)
class AccuracyCase:
    """Data for accuracy: group mean ``mean_over_std`` times the spread ``std``, in ``dtype``."""

    name: str
    dtype: str
    mean_over_std: float
    std: float = 1.0
    clip: float | None = None


ACCURACY_CASES = (
    AccuracyCase("float32, mean 0", "float32", 0.0),
    AccuracyCase("float32, mean 1e2 x spread", "float32", 1e2),
    AccuracyCase("float32, mean 1e4 x spread", "float32", 1e4),
    AccuracyCase("float16, |x| up to 6e4", "float16", 10.0, std=5e3, clip=6e4),
)


def run_accuracy(
    spec: Spec,
    frameworks: Sequence[str],
    *,
    cases: Sequence[AccuracyCase] = ACCURACY_CASES,
    seed: int = 0,
    device: str = "cpu",
    progress: Progress = _no_progress,
) -> list[dict[str, Any]]:
    """Max abs error of every implementation's forward output against a float64 reference; JSON rows."""
    rows: list[dict[str, Any]] = []
    for case in cases:
        case_spec = Spec(spec.shape, spec.layout, case.dtype, spec.groups, spec.epsilon, spec.activation)
        data = make_data(case_spec, mean_over_std=case.mean_over_std, std=case.std, clip=case.clip, seed=seed)
        ref = reference(case_spec, data.x)
        for framework in frameworks:
            progress(0, f"accuracy: {framework}, {case.name}")
            for c in build(framework, data, device):
                if c.role == "floor":
                    continue
                rows.append(_accuracy_row(framework, case, c, ref))
            progress(1, f"accuracy: {framework}, {case.name}")
    return rows


def _accuracy_row(framework: str, case: AccuracyCase, c: Candidate, ref: np.ndarray) -> dict[str, Any]:
    row: dict[str, Any] = {
        "framework": framework,
        "candidate": c.name,
        "role": c.role,
        "variant": c.variant,
        "case": case.name,
        "dtype": case.dtype,
        "mean_over_std": case.mean_over_std,
        "status": c.status,
        "detail": c.detail,
        "max_abs_error": None,
        "nan_count": None,
        "inf_count": None,
    }
    if c.status != "ok" or c.output is None:
        return row
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            y = np.asarray(c.output())
    except Exception as e:
        row.update(status="error", detail=describe_error(e))
        return row
    if y.shape != ref.shape:
        row.update(status="error", detail=f"output shape {y.shape}, expected {ref.shape}")
        return row
    yd = y.astype(np.float64)
    finite = np.isfinite(yd)
    row["nan_count"] = int(np.isnan(yd).sum())
    row["inf_count"] = int(np.isinf(yd).sum())
    if finite.any():
        row["max_abs_error"] = float(np.abs(yd - ref)[finite].max())
    if str(y.dtype) != case.dtype:
        row["detail"] = f"output dtype {y.dtype}"
    return row
