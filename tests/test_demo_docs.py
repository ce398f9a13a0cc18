"""The Python examples in docs/demo.md run as written; the tables it and the README publish are the shipped run's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from groupnorm.demo import report

DOC = Path(__file__).resolve().parents[1] / "docs" / "demo.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_the_page_has_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for block in BLOCKS[: index + 1]:  # later examples may use names defined by earlier ones
        exec(compile(block, f"{DOC.name} example", "exec"), namespace)


def test_published_tables_are_the_shipped_run() -> None:
    # the README and docs/demo.md quote the default run whose files ship in docs/: the same tables, cell for cell
    results = json.loads((DOC.parent / "groupnorm-demo.json").read_text())
    readme = (DOC.parents[1] / "README.md").read_text()
    page = DOC.read_text()
    main_table = report.markdown(report.main_rows(results))
    assert main_table in readme
    assert main_table in page
    assert report.markdown(report.extra_rows(results)) in page
    assert len(results["seeds"]) >= 3
