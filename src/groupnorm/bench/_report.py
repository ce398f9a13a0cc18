"""The results as a terminal table, as JSON (with its schema and a validator) and as a PNG chart."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import math
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = ["SCHEMA", "SCHEMA_ID", "machine", "markdown", "plot", "print_tables", "validate"]

SCHEMA_ID = "groupnorm-bench/1"

_ROLES = ("groupnorm", "peer", "floor")
MODES_ORDER = ("forward", "forward+backward")
_STATUS = ("ok", "missing", "error")

#: The JSON document, field by field. A type is one of "str", "int", "number", "bool", a ``|null`` of
#: those, ``list[T]``, a tuple of allowed strings, or a nested dict; ``runs`` is a list of ``_RUN``. A key
#: that ends in ``?`` may be absent (documents written before it existed).
_SPEED_ROW: dict[str, Any] = {
    "framework": "str",
    "candidate": "str",
    "role": _ROLES,
    "variant": "str",
    "layout": "str",
    "mode": ("forward", "forward+backward"),
    "status": _STATUS,
    "detail": "str",
    "median_s": "number|null",
    "samples_s": "list[number]",
    "calls_per_sample": "int|null",
    "gb_per_s": "number|null",
    "vs_floor": "number|null",
}
_COMPARISON: dict[str, Any] = {
    "framework": "str",
    "variant": "str",
    "mode": ("forward", "forward+backward"),
    "groupnorm": "str",
    "peer": "str",
    "groupnorm_median_s": "number|null",
    "peer_median_s": "number|null",
    "ratio": "number|null",
}
_ACCURACY_ROW: dict[str, Any] = {
    "framework": "str",
    "candidate": "str",
    "role": _ROLES,
    "variant": "str",
    "case": "str",
    "dtype": "str",
    "mean_over_std": "number",
    "status": _STATUS,
    "detail": "str",
    "max_abs_error": "number|null",
    "nan_count": "int|null",
    "inf_count": "int|null",
}
_CONFIG: dict[str, Any] = {
    "shape": "list[int]",
    "layout": ("NHWC", "NCHW"),
    "dtype": "str",
    "groups": "int",
    "epsilon": "number",
    "activation": "str|null",
    "frameworks": "list[str]",
    "modes": "list[str]",
    "repeats": "int",
    "warmup": "int",
    "min_sample_s": "number",
    "seed": "int",
    "mean_over_std": "number",
    "threads": "int|null",
    "sweep?": "str|null",
    "device?": "str",
}
_RUN: dict[str, Any] = {
    "command": "str",
    "config": _CONFIG,
    "speed": [_SPEED_ROW],
    "comparisons": [_COMPARISON],
    "accuracy": [_ACCURACY_ROW],
}
_SWEEP_ROW: dict[str, Any] = {
    "shape": "list[int]",
    "nbytes": "int",
    "variant": "str",
    "mode": ("forward", "forward+backward"),
    "groupnorm_median_s": "number|null",
    "peer_median_s": "number|null",
    "ratio": "number|null",
    "groupnorm_vs_floor": "number|null",
    "peer_vs_floor": "number|null",
}
_SWEEP: dict[str, Any] = {
    "sweep": "str",
    "command": "str",
    "framework": "str",
    "threads": "int|null",
    "device": "str",
    "groupnorm": "str",
    "peer": "str",
    "rows": [_SWEEP_ROW],
    "geomeans": [{"variant": "str", "mode": ("forward", "forward+backward"), "ratio": "number|null", "shapes": "int"}],
    "worst_forward_ratio": "number|null",
    "worst_forward_shape": "list[int]",
    "worst_forward_variant": "str",
    "smallest_shape": "list[int]",
    "smallest": [_SWEEP_ROW],
}
SCHEMA: dict[str, Any] = {
    "schema": (SCHEMA_ID,),
    "groupnorm_version": "str",
    "created": "str",
    "machine": {
        "platform": "str",
        "processor": "str",
        "cpu_count": "int|null",
        "cpus_usable": "int|null",
        "python": "str",
        "versions": "dict[str]",
    },
    "runs": [_RUN],
    "sweeps?": [_SWEEP],
}


def _check(value: Any, kind: Any, where: str, errors: list[str]) -> None:
    if isinstance(kind, dict):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected an object, got {type(value).__name__}")
            return
        fields = {key.rstrip("?"): key for key in kind}
        required = {name for name, key in fields.items() if not key.endswith("?")}
        for key in sorted(required - value.keys()):
            errors.append(f"{where}: missing {key!r}")
        for key in sorted(value.keys() - fields.keys()):
            errors.append(f"{where}: unexpected {key!r}")
        for key in sorted(fields.keys() & value.keys()):
            _check(value[key], kind[fields[key]], f"{where}.{key}", errors)
    elif isinstance(kind, list):
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _check(item, kind[0], f"{where}[{i}]", errors)
    elif isinstance(kind, tuple):
        if value not in kind:
            errors.append(f"{where}: {value!r} is not one of {kind}")
    elif kind.endswith("|null"):
        if value is not None:
            _check(value, kind[: -len("|null")], where, errors)
    elif kind.startswith("list["):
        _check(value, [kind[5:-1]], where, errors)
    elif kind.startswith("dict["):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            errors.append(f"{where}: expected an object with string keys")
        else:
            for k, v in value.items():
                _check(v, kind[5:-1], f"{where}.{k}", errors)
    else:
        ok = {
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, int | float) and not isinstance(value, bool),
        }[kind]
        if not ok:
            errors.append(f"{where}: expected {kind}, got {value!r}")


def validate(doc: Any) -> list[str]:
    """Everything in ``doc`` that does not follow :data:`SCHEMA`; empty when it conforms."""
    errors: list[str] = []
    _check(doc, SCHEMA, "$", errors)
    return errors


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine and the versions of every framework a benchmark may use."""
    versions: dict[str, str] = {}
    for dist in (
        "numpy",
        "torch",
        "tensorflow",
        "tensorflow-cpu",
        "keras",
        "tf-keras",
        "tf-slim",
        "jax",
        "jaxlib",
        "flax",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "platform": platform.platform(),
        "processor": _processor(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "python": sys.version.split()[0],
        "versions": versions,
    }


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------- tables


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None or not math.isfinite(value) else format(value, spec)


def _shape(config: dict[str, Any]) -> str:
    return "x".join(str(d) for d in config["shape"])


def speed_rows(run: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in run["speed"]:
        ms = None if r["median_s"] is None else r["median_s"] * 1e3
        note = r["status"]
        out.append(
            [
                r["framework"],
                r["variant"],
                r["mode"],
                r["candidate"],
                _fmt(ms, ".3g"),
                _fmt(r["gb_per_s"], ".3g"),
                _fmt(r["vs_floor"], ".2f"),
                note,
            ]
        )
    return out


def ratio_rows(run: dict[str, Any]) -> list[list[str]]:
    out = []
    for c in run["comparisons"]:
        g = None if c["groupnorm_median_s"] is None else c["groupnorm_median_s"] * 1e3
        p = None if c["peer_median_s"] is None else c["peer_median_s"] * 1e3
        ratio = _fmt(c["ratio"], ".2f") or "n/a"
        out.append(
            [c["framework"], c["variant"], c["mode"], c["groupnorm"], c["peer"], _fmt(g, ".3g"), _fmt(p, ".3g"), ratio]
        )
    return out


def _cell(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return str(r["status"])
    text = "all non-finite" if r["max_abs_error"] is None else f"{r['max_abs_error']:.1e}"
    bad = [f"{r[k]} {name}" for k, name in (("nan_count", "NaN"), ("inf_count", "Inf")) if r[k]]
    return ", ".join([text, *bad])


def accuracy_table(run: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: one row per implementation, one column per data case."""
    cases: list[str] = []
    table: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in run["accuracy"]:
        if r["case"] not in cases:
            cases.append(r["case"])
        table.setdefault((r["framework"], r["variant"], r["candidate"]), {})[r["case"]] = _cell(r)
    headers = ["framework", "implementation", *cases]
    rows = [
        [fw, f"{name} ({variant})" if variant else name, *(cells.get(c, "") for c in cases)]
        for (fw, variant, name), cells in table.items()
    ]
    return headers, rows


def _notes(run: dict[str, Any]) -> list[str]:
    seen: dict[str, None] = {}
    for r in [*run["speed"], *run["accuracy"]]:
        if r["status"] != "ok":
            seen[f"{r['candidate']}: {r['status']}: {r['detail']}"] = None
    return list(seen)


_SHORT_MODE = {"forward": "fwd", "forward+backward": "fwd+bwd"}


def _us(seconds: float | None) -> str:
    """A per-call time in us below a millisecond, in ms above."""
    if seconds is None:
        return ""
    return f"{seconds * 1e6:.3g} us" if seconds < 1e-3 else f"{seconds * 1e3:.3g} ms"


def sweep_table(summary: dict[str, Any]) -> tuple[str, list[str], list[list[str]], list[str]]:
    """Title, headers, one row per shape (and one of geometric means), and the summary lines of a sweep."""
    variants = list(dict.fromkeys(r["variant"] for r in summary["rows"]))
    cells: dict[tuple[str, str, str], dict[str, Any]] = {
        ("x".join(map(str, r["shape"])), r["variant"], r["mode"]): r for r in summary["rows"]
    }
    headers = ["shape", "MiB"]
    for v in variants:
        headers += [f"{v} {_SHORT_MODE[m]}" for m in MODES_ORDER] + [f"{v} fwd x floor (ours / peer)"]
    rows: list[list[str]] = []
    for shape in dict.fromkeys("x".join(map(str, r["shape"])) for r in summary["rows"]):
        first = next(r for r in summary["rows"] if "x".join(map(str, r["shape"])) == shape)
        row = [shape, f"{first['nbytes'] / 2**20:.3g}"]
        for v in variants:
            row += [_fmt(cells.get((shape, v, m), {}).get("ratio"), ".2f") for m in MODES_ORDER]
            fwd = cells.get((shape, v, "forward"), {})
            row.append(f"{_fmt(fwd.get('groupnorm_vs_floor'), '.2f')} / {_fmt(fwd.get('peer_vs_floor'), '.2f')}")
        rows.append(row)
    means = {(g["variant"], g["mode"]): g for g in summary["geomeans"]}
    row = ["geomean", ""]
    for v in variants:
        row += [_fmt(means.get((v, m), {}).get("ratio"), ".2f") for m in MODES_ORDER] + [""]
    rows.append(row)
    lines = []
    for m in MODES_ORDER:
        g = means.get(("all", m))
        if g is not None:
            lines.append(f"geometric mean {m} over every layout and shape: {_fmt(g['ratio'], '.2f')}")
    if summary["worst_forward_ratio"] is not None:
        worst = "x".join(map(str, summary["worst_forward_shape"]))
        lines.append(
            f"worst forward ratio: {summary['worst_forward_ratio']:.2f} ({worst}, {summary['worst_forward_variant']})"
        )
    for r in summary["smallest"]:
        lines.append(
            f"smallest shape {'x'.join(map(str, r['shape']))}, {r['variant']} {r['mode']}: "
            f"{_us(r['groupnorm_median_s'])} against {_us(r['peer_median_s'])} per call "
            f"(ratio {_fmt(r['ratio'], '.2f') or 'n/a'})"
        )
    device = "" if summary["device"] == "cpu" else f" on {summary['device']}"
    title = (
        f"Sweep ({summary['sweep']}){device}: {summary['groupnorm']} / {summary['peer']}, "
        f"threads: {summary['threads'] or 'default'} (< 1: groupnorm is faster; x floor: time / a copy into a "
        "written buffer, forward+backward against 2.5 copies)"
    )
    return title, headers, rows, lines


def print_tables(doc: dict[str, Any], file: TextIO | None = None) -> None:
    """Print every run's tables (a sweep's: its summary), with rich where it is installed."""
    for summary in doc.get("sweeps", []):
        title, headers, rows, lines = sweep_table(summary)
        _table(title, headers, rows, file)
        print("\n".join(lines), file=file or sys.stdout)
    for run in doc["runs"]:
        cfg = run["config"]
        if cfg.get("sweep"):
            notes = _notes(run)
            if notes:
                print(
                    "\n".join([f"Not measured ({_shape(cfg)}):", *(f"  {n}" for n in notes)]), file=file or sys.stdout
                )
            continue
        title = f"{_shape(cfg)} {cfg['layout']} {cfg['dtype']}, {cfg['groups']} groups" + (
            f", {cfg['activation']}" if cfg["activation"] else ""
        )
        if run["speed"]:
            _table(
                f"Speed: {title} (median of {cfg['repeats']} interleaved rounds)",
                ["framework", "variant", "mode", "implementation", "ms", "GB/s", "x floor", "status"],
                speed_rows(run),
                file,
            )
        if run["comparisons"]:
            _table(
                f"groupnorm / peer (< 1: groupnorm is faster): {title}",
                ["framework", "variant", "mode", "groupnorm", "peer", "groupnorm ms", "peer ms", "ratio"],
                ratio_rows(run),
                file,
            )
        if run["accuracy"]:
            headers, rows = accuracy_table(run)
            _table(f"Max abs error vs float64: {_title(cfg, False)} (gamma = 1, beta = 0)", headers, rows, file)
        notes = _notes(run)
        if notes:
            print("\n".join(["Not measured:", *(f"  {n}" for n in notes)]), file=file or sys.stdout)


def _title(cfg: dict[str, Any], dtype: bool = True) -> str:
    """The configuration in words; accuracy runs set their own dtypes, so they leave it out."""
    kind = f" {cfg['dtype']}" if dtype else ""
    return f"{_shape(cfg)} {cfg['layout']}{kind}, {cfg['groups']} groups" + (
        f", {cfg['activation']}" if cfg["activation"] else ""
    )


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(headers), line(["---"] * len(headers)), *(line(r) for r in rows), ""]


def markdown(doc: dict[str, Any]) -> str:
    """Every run's ratios, timings and accuracy as Markdown tables, headed by the command."""
    out: list[str] = []
    for summary in doc.get("sweeps", []):
        title, headers, rows, lines = sweep_table(summary)
        out += [f"`{summary['command']}`", "", title, "", *_md_table(headers, rows), *(f"- {x}" for x in lines), ""]
    for run in doc["runs"]:
        cfg = run["config"]
        if cfg.get("sweep"):
            continue
        head = f"{_title(cfg, dtype=bool(run['speed']))}, threads: {cfg['threads'] or 'default'}"
        out += [f"`{run['command']}`", "", head, ""]
        if run["comparisons"]:
            headers = ["framework", "variant", "mode", "groupnorm", "peer", "groupnorm ms", "peer ms", "ratio"]
            out += _md_table(headers, ratio_rows(run))
        if run["speed"]:
            headers = ["framework", "variant", "mode", "implementation", "ms", "GB/s", "x floor", "status"]
            out += _md_table(headers, speed_rows(run))
        if run["accuracy"]:
            out += _md_table(*accuracy_table(run))
        notes = _notes(run)
        if notes:
            out += [*(f"- {n}" for n in notes), ""]
    return "\n".join(out)


def _table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], file: TextIO | None) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich comes with the bench extra
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        lines = [title, "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        print("\n".join(lines), file=file or sys.stdout)
        return
    table = Table(title=title, title_justify="left")
    for h in headers:
        table.add_column(h, overflow="fold")
    for r in rows:
        table.add_row(*r)
    console = Console(file=file)
    if not console.is_terminal:
        console = Console(file=file, width=160)
    console.print(table)


# ------------------------------------------------------------------------------------------------ chart


def _label(run: dict[str, Any], c: dict[str, Any]) -> str:
    cfg = run["config"]
    parts = [c["framework"] + (f" {c['variant']}" if c["variant"] else ""), c["mode"]]
    if "(" in c["groupnorm"]:
        parts.append(c["groupnorm"][c["groupnorm"].index("(") + 1 : -1])
    if cfg["activation"]:
        parts.append(cfg["activation"])
    if cfg["dtype"] != "float32":
        parts.append(cfg["dtype"])
    if cfg["mean_over_std"]:
        parts.append(f"mean {cfg['mean_over_std']:g} x spread")
    parts.append(f"threads {cfg['threads'] or 'default'}")
    return ", ".join(parts) + f" [{_shape(cfg)}]"


def plot(doc: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """A PNG: groupnorm / peer time ratios as bars, and the accuracy table(s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import Bbox

    bars = [(_label(run, c), c["ratio"], c["peer"]) for run in doc["runs"] for c in run["comparisons"] if c["ratio"]]
    tables = [(*accuracy_table(run), run["config"]) for run in doc["runs"] if run["accuracy"]]
    bar_h = 0.3 * len(bars) + 1.3 if bars else 0.0
    table_hs = [0.24 * (len(rows) + 1) + 0.6 for _, rows, _ in tables]
    height = max(1.0, bar_h + sum(table_hs) + 0.2)
    fig = plt.figure(figsize=(13, height))
    top = height
    if bars:
        top -= bar_h
        ax = fig.add_axes((0.45, (top + 0.75) / height, 0.47, (bar_h - 1.15) / height))
        y = list(range(len(bars)))[::-1]
        ratios = [b[1] for b in bars]
        colors = ["tab:green" if r <= 1 else "tab:red" for r in ratios]
        ax.barh(y, [r - 1 for r in ratios], left=1, color=colors)  # from 1: faster left, slower right
        ax.set_yticks(y, [f"{b[0]} vs {b[2]}" for b in bars], fontsize=8)
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("groupnorm time / peer time (median; < 1: groupnorm is faster)", fontsize=9)
        for yy, r in zip(y, ratios, strict=True):
            ax.text(r, yy, f" {r:.2f}", va="center", fontsize=8)
        ax.set_title("Speed: ratio of medians, interleaved in one process", fontsize=10)
    for (headers, rows, cfg), h in zip(tables, table_hs, strict=True):
        top -= h
        ax = fig.add_axes((0.01, (top + 0.1) / height, 0.98, (h - 0.5) / height))
        ax.axis("off")
        t = ax.table(cellText=rows, colLabels=headers, cellLoc="left", bbox=Bbox.from_bounds(0, 0, 1, 1))
        t.auto_set_font_size(False)
        t.set_fontsize(8)
        t.auto_set_column_width(list(range(len(headers))))
        ax.set_title(f"Max abs error vs float64 ({_shape(cfg)} {cfg['layout']}, {cfg['groups']} groups)", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
