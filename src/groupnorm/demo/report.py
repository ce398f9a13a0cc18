"""The demo's outputs: the error table on the terminal, the results as JSON, the chart as PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

JSON_NAME = "groupnorm-demo.json"
CHART_NAME = "groupnorm-demo.png"
#: Line colours: the paper draws BatchNorm blue and GroupNorm red.
COLORS = {"BN": "tab:blue", "LN": "tab:green", "IN": "tab:purple", "GN": "tab:red"}


def print_table(results: dict[str, Any], console: Console | None = None) -> None:
    """Validation error (%) per normalization (rows) and batch size (columns), as the paper's Table 2."""
    batches = [str(b) for b in results["batch_sizes"]]
    table = Table(title=f"validation error (%), {results['data']}")
    table.add_column("batch size")
    for batch in batches:
        table.add_column(batch, justify="right")
    for kind, name in results["norms"].items():
        table.add_row(name, *(f"{100 * results['val_error'][kind][b]:.1f}" for b in batches))
    (console or Console()).print(table)


def write_json(results: dict[str, Any], out: Path) -> Path:
    path = out / JSON_NAME
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def write_chart(results: dict[str, Any], out: Path) -> Path:
    """Validation error against batch size, one line per normalization, batch 32 on the left (Figure 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = results["batch_sizes"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for kind, name in results["norms"].items():
        errors = [100 * results["val_error"][kind][str(b)] for b in batches]
        ax.plot(range(len(batches)), errors, "o-", color=COLORS.get(kind), label=name, linewidth=2)
    ax.set_xticks(range(len(batches)), [str(b) for b in batches])
    ax.set_xlabel("batch size (images per step)")
    ax.set_ylabel("validation error (%)")
    ax.set_title(f"{results['epochs']} epochs, {results['train_samples']} training images", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / CHART_NAME
    fig.savefig(path)
    plt.close(fig)
    return path
