"""``--sweep``: one framework's list of shapes, each timed as an ordinary run, and the summary over them.

Each shape (at each thread count) is one run of the document, as a single ``groupnorm bench`` would make
it, marked with the sweep's name in its config. :func:`summarize` reads those runs back: per shape, the
ratio groupnorm / peer in every variant (torch: contiguous, channels_last) and mode, and each one's time
against the copy floor; over the shapes, the geometric mean of the ratios per variant and mode (and over
both variants), the worst forward ratio, and the smallest shape's per-call times, where a call's fixed
cost shows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from groupnorm.bench._core import MODES

__all__ = ["ALL_VARIANTS", "geomean", "summarize"]

#: the ``variant`` of the geometric means taken over every variant together
ALL_VARIANTS = "all"


def geomean(values: Iterable[float]) -> float | None:
    """Geometric mean of positive ``values``; ``None`` when there are none."""
    logs = [math.log(v) for v in values]
    return math.exp(sum(logs) / len(logs)) if logs else None


def _speed(run: dict[str, Any], candidate: str, variant: str, mode: str) -> dict[str, Any] | None:
    return next(
        (r for r in run["speed"] if (r["candidate"], r["variant"], r["mode"]) == (candidate, variant, mode)), None
    )


def _nbytes(run: dict[str, Any]) -> int:
    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}.get(run["config"]["dtype"], 4)
    return int(math.prod(run["config"]["shape"])) * itemsize


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (sweep, framework, thread count, device) found in ``runs``, in order of appearance."""
    groups: dict[tuple[str, str, int | None, str], list[dict[str, Any]]] = {}
    for run in runs:
        cfg = run["config"]
        if not cfg.get("sweep"):
            continue
        for framework in cfg["frameworks"]:
            key = (cfg["sweep"], framework, cfg["threads"], cfg.get("device", "cpu"))
            groups.setdefault(key, []).append(run)
    return [_summary(*key, members) for key, members in groups.items()]


def _summary(
    sweep: str, framework: str, threads: int | None, device: str, runs: list[dict[str, Any]]
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    names: tuple[str, str] = ("", "")
    for run in runs:
        for c in run["comparisons"]:
            if c["framework"] != framework:
                continue
            names = (c["groupnorm"], c["peer"])
            ours = _speed(run, c["groupnorm"], c["variant"], c["mode"])
            peer = _speed(run, c["peer"], c["variant"], c["mode"])
            rows.append(
                {
                    "shape": list(run["config"]["shape"]),
                    "nbytes": _nbytes(run),
                    "variant": c["variant"],
                    "mode": c["mode"],
                    "groupnorm_median_s": c["groupnorm_median_s"],
                    "peer_median_s": c["peer_median_s"],
                    "ratio": c["ratio"],
                    "groupnorm_vs_floor": None if ours is None else ours["vs_floor"],
                    "peer_vs_floor": None if peer is None else peer["vs_floor"],
                }
            )
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    geomeans = []
    for variant in [*variants, ALL_VARIANTS] if len(variants) > 1 else variants:
        for mode in MODES:
            ratios = [
                r["ratio"]
                for r in rows
                if r["mode"] == mode and variant in (r["variant"], ALL_VARIANTS) and r["ratio"] is not None
            ]
            if ratios or any(r["mode"] == mode for r in rows):
                geomeans.append({"variant": variant, "mode": mode, "ratio": geomean(ratios), "shapes": len(ratios)})
    forward = [r for r in rows if r["mode"] == "forward" and r["ratio"] is not None]
    worst = max(forward, key=lambda r: r["ratio"], default=None)
    smallest_shape: list[int] = min((r["shape"] for r in rows), key=math.prod, default=[])
    return {
        "sweep": sweep,
        "command": runs[0]["command"],
        "framework": framework,
        "threads": threads,
        "device": device,
        "groupnorm": names[0],
        "peer": names[1],
        "rows": rows,
        "geomeans": geomeans,
        "worst_forward_ratio": None if worst is None else worst["ratio"],
        "worst_forward_shape": [] if worst is None else worst["shape"],
        "worst_forward_variant": "" if worst is None else worst["variant"],
        "smallest_shape": smallest_shape,
        "smallest": [r for r in rows if r["shape"] == smallest_shape],
    }
