"""The ``groupnorm`` command checks its optional dependencies before any work and names the extra to install.

A missing package is simulated in a fresh interpreter by ``sys.modules[name] = None``, which makes both
``import name`` and ``importlib.util.find_spec(name)`` report it as not installed, whether or not it is.
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import groupnorm
import groupnorm.cli
from groupnorm.cli import BENCH_FRAMEWORKS, DEMO, Needs, main, missing_modules

#: where the groupnorm under test is imported from (the checkout's src/, or an installed copy)
PACKAGE_PARENT = str(Path(groupnorm.__file__).resolve().parents[1])

#: modules whose import would mean that a command started its work
WORK = ("torch", "rich", "matplotlib", "groupnorm.demo.data", "groupnorm.demo.train", "groupnorm.bench.fw_numpy")


def run_cli(argv: list[str], blocked: tuple[str, ...], cwd: Path) -> dict[str, Any]:
    """``groupnorm.cli.main(argv)`` in a fresh interpreter where ``blocked`` modules are not installed."""
    script = textwrap.dedent(
        f"""
        import json, sys
        for name in {blocked!r}:
            sys.modules[name] = None
        from groupnorm.cli import main
        try:
            status = main({argv!r})
        except SystemExit as e:
            status = e.code
        loaded = [m for m in {WORK!r} if sys.modules.get(m) is not None]
        print("RESULT=" + json.dumps({{"status": status, "loaded": loaded}}))
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PACKAGE_PARENT, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, env=env, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT=")]
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT="))
    result["stderr"], result["stdout"] = done.stderr, done.stdout
    return result


def not_installed_part(message: str) -> str:
    """The names after 'not installed:' in a dependency error."""
    return message.split("not installed:", 1)[1].split(".", 1)[0]


def test_missing_modules_finds_without_importing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)
    assert missing_modules(["numpy", "rich", "groupnorm_no_such_module"]) == ["rich", "groupnorm_no_such_module"]
    assert missing_modules(["numpy", "json"]) == []


def test_needs_names_the_missing_modules_and_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    problem = DEMO.problem()
    assert problem is not None
    assert problem.startswith("groupnorm demo needs torch, rich and matplotlib; not installed: ")
    assert "rich and matplotlib" in not_installed_part(problem)
    assert problem.endswith("Install them: pip install 'groupnorm[demo]'")
    assert Needs(("numpy",), ("bench",), "x").problem() is None
    assert Needs(("a",), ("keras", "tf"), "x").install_command() == "pip install 'groupnorm[keras,tf]'"


@pytest.mark.parametrize("blocked", [("torch",), ("rich",), ("matplotlib",), ("torch", "rich", "matplotlib")])
def test_demo_stops_before_any_work(tmp_path: Path, blocked: tuple[str, ...]) -> None:
    out = tmp_path / "results"
    result = run_cli(["demo", "--quick", "--out", str(out)], blocked, tmp_path)
    assert result["status"] == 1
    assert result["stdout"].startswith("RESULT=")  # nothing printed by the command itself
    (message,) = result["stderr"].strip().splitlines()
    assert message.startswith("error: groupnorm demo needs torch, rich and matplotlib; not installed: ")
    assert all(name in not_installed_part(message) for name in blocked)
    assert message.endswith("pip install 'groupnorm[demo]'")
    assert result["loaded"] == []  # no data generated, nothing imported to train or to report
    assert not out.exists()


def test_help_needs_no_optional_dependency(tmp_path: Path) -> None:
    result = run_cli(["demo", "--help"], ("torch", "rich", "matplotlib"), tmp_path)
    assert result["status"] == 0
    assert "--quick" in result["stdout"]


def test_bench_plot_stops_before_measuring(tmp_path: Path) -> None:
    doc = tmp_path / "bench.json"
    argv = ["bench", "-f", "numpy", "--shape", "2,8,4,4", "--groups", "4", "-q", "--json", str(doc), "--plot", "x.png"]
    result = run_cli(argv, ("matplotlib",), tmp_path)
    assert result["status"] == 1
    (message,) = result["stderr"].strip().splitlines()
    assert message == (
        "error: groupnorm bench --plot needs matplotlib; not installed: matplotlib. "
        "Install them: pip install 'groupnorm[bench]'"
    )
    assert result["loaded"] == []
    assert not doc.exists() and not (tmp_path / "x.png").exists()


def test_bench_load_plot_stops_before_loading(tmp_path: Path) -> None:
    result = run_cli(["bench", "--load", "saved.json", "--plot", "x.png"], ("matplotlib",), tmp_path)
    assert result["status"] == 1
    assert "pip install 'groupnorm[bench]'" in result["stderr"]
    assert "saved.json" not in result["stderr"]  # the missing file was never opened


@pytest.mark.parametrize(
    ("framework", "blocked", "install"),
    [
        ("torch", ("torch",), "pip install 'groupnorm[torch]'"),
        ("keras", ("tensorflow",), "pip install 'groupnorm[keras,tf]'"),
        ("tf1", ("tensorflow",), "pip install 'groupnorm[tf]'"),
        ("flax", ("flax",), "pip install 'groupnorm[jax]'"),
    ],
)
def test_bench_of_a_missing_framework_alone_stops(
    tmp_path: Path, framework: str, blocked: tuple[str, ...], install: str
) -> None:
    result = run_cli(["bench", "-f", framework, "-q"], blocked, tmp_path)
    assert result["status"] == 1
    assert result["stderr"].startswith(f"error: groupnorm bench --framework {framework} needs ")
    assert all(name in not_installed_part(result["stderr"]) for name in blocked)
    assert result["stderr"].strip().endswith(install)
    assert result["loaded"] == []


def test_bench_reports_a_missing_framework_and_runs_the_others(tmp_path: Path) -> None:
    doc = tmp_path / "bench.json"
    argv = ["bench", "-f", "numpy,torch", "--shape", "2,8,4,4", "--groups", "4", "--repeats", "1", "--warmup", "0"]
    result = run_cli([*argv, "--min-time", "0", "--mode", "forward", "-q", "--json", str(doc)], ("torch",), tmp_path)
    assert result["status"] == 0
    assert result["stderr"].strip() == (
        "groupnorm bench: torch is reported as missing (torch not installed; pip install 'groupnorm[torch]')"
    )
    rows = json.loads(doc.read_text())["runs"][0]["speed"]
    assert {r["status"] for r in rows if r["framework"] == "numpy"} == {"ok"}
    assert {r["status"] for r in rows if r["framework"] == "torch"} == {"missing"}


def test_bench_framework_table_covers_every_framework() -> None:
    from groupnorm.bench._core import FRAMEWORKS

    assert set(BENCH_FRAMEWORKS) == set(FRAMEWORKS)


def test_main_reports_missing_dependencies_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["bench", "-f", "numpy", "-q", "--plot", str(tmp_path / "x.png")]) == 1
    assert "pip install 'groupnorm[bench]'" in capsys.readouterr().err


def test_docstring_examples_run() -> None:
    failures, tried = doctest.testmod(groupnorm.cli, raise_on_error=False, verbose=False)
    assert tried >= 2 and failures == 0
