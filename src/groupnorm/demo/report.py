"""The demo's outputs: the error tables on the terminal, the results as JSON, the chart as PNG.

Every cell of the results holds one value per seed; the tables and the chart show their mean and their
sample standard deviation (the spread from one seed to the next).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

JSON_NAME = "groupnorm-demo.json"
CHART_NAME = "groupnorm-demo.png"
#: Line colours: the paper draws BatchNorm blue and GroupNorm red.
COLORS = {"BN": "tab:blue", "LN": "tab:green", "IN": "tab:purple", "GN": "tab:red"}


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of ``values`` (spread 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: list[float] | None) -> str:
    """A table cell: the mean percentage and its spread over the seeds, ``-`` where nothing was trained."""
    if not values:
        return "-"
    mean, spread = mean_and_spread(values)
    return f"{100 * mean:.1f} ± {100 * spread:.1f}"


def main_rows(results: dict[str, Any]) -> list[list[str]]:
    """The batch-size table: a header, then one row per normalization, cells as :func:`cell` writes them."""
    batches = [str(b) for b in results["batch_sizes"]]
    rows = [["batch size", *batches]]
    for kind, name in results["norms"].items():
        rows.append([name, *(cell(results["val_error"].get(kind, {}).get(b)) for b in batches)])
    return rows


def extra_rows(results: dict[str, Any]) -> list[list[str]]:
    """The input x implementation table: a header (one column per GroupNorm class), then one row per input."""
    extra = results["extra"]
    rows = [["GroupNorm, batch 32", *extra["layers"].values()]]
    for key, name in extra["inputs"].items():
        rows.append([name, *(cell(extra["val_error"].get(layer, {}).get(key)) for layer in extra["layers"])])
    return rows


def norm_error_line(results: dict[str, Any]) -> str:
    """One sentence: the largest error of each class's first normalization against float64, per input."""
    extra = results["extra"]
    parts = []
    for layer, name in extra["layers"].items():
        errors = extra["norm_error"].get(layer, {})
        worst = ", ".join(f"{extra['inputs'][key]} {max(errors[key]):.1e}" for key in extra["inputs"] if key in errors)
        parts.append(f"{name}: {worst}")
    return "largest error of the first GroupNorm's output against float64, on validation images: " + "; ".join(parts)


def print_table(results: dict[str, Any], console: Console | None = None) -> None:
    """Validation error (%) per normalization and batch size (the paper's Figure 1), then the extra table."""
    console = console or Console()
    seeds = len(results["seeds"])
    for title, rows in (
        (f"validation error (%), mean ± spread over {seeds} seeds, {results['data']}", main_rows(results)),
        ("validation error (%) of GroupNorm at batch 32, by implementation and input", extra_rows(results)),
    ):
        table = Table(title=title)
        table.add_column(rows[0][0], min_width=max(len(row[0]) for row in rows[1:]))  # names never cut
        for header in rows[0][1:]:
            table.add_column(header, justify="right")
        for row in rows[1:]:
            table.add_row(*row)
        console.print(table)
    console.print(norm_error_line(results))


def markdown(rows: list[list[str]]) -> str:
    """``rows`` (a header, then data) as a Markdown table, numbers right-aligned."""
    lines = ["| " + " | ".join(rows[0]) + " |", "| --- |" + " ---: |" * (len(rows[0]) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def write_json(results: dict[str, Any], out: Path) -> Path:
    path = out / JSON_NAME
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def write_chart(results: dict[str, Any], out: Path) -> Path:
    """Validation error against batch size with error bars, batch 32 on the left (the paper's Figure 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = results["batch_sizes"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for kind, name in results["norms"].items():
        cells = results["val_error"].get(kind, {})
        points = [(i, *mean_and_spread(cells[str(b)])) for i, b in enumerate(batches) if str(b) in cells]
        if not points:
            continue
        x, mean, spread = zip(*points, strict=True)
        style = "o-" if len(points) > 1 else "s"
        ax.errorbar(
            x,
            [100 * m for m in mean],
            yerr=[100 * s for s in spread],
            fmt=style,
            color=COLORS.get(kind),
            label=name,
            linewidth=2,
            capsize=4,
        )
    ax.set_xticks(range(len(batches)), [str(b) for b in batches])
    ax.set_xlabel("batch size (images per step)")
    ax.set_ylabel("validation error (%)")
    seeds = len(results["seeds"])
    ax.set_title(
        f"{results['epochs']} epochs, {results['train_samples']} training images; "
        f"mean ± spread over {seeds} seed{'s' if seeds > 1 else ''}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / CHART_NAME
    fig.savefig(path)
    plt.close(fig)
    return path
