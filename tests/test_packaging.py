"""The distribution: a plain install pulls no deep-learning framework; every framework has an extra."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "tensorflow", "tf-keras", "keras", "jax", "flax")


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()


def test_plain_install_needs_only_numpy():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [requirement_name(r) for r in project["dependencies"]] == ["numpy"]
    assert project["requires-python"] == ">=3.10"


def test_each_framework_has_an_extra_and_all_has_every_one():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"torch", "tf", "jax", "all"} <= set(extras)
    assert "torch" in map(requirement_name, extras["torch"])
    assert "tensorflow" in map(requirement_name, extras["tf"])
    assert "jax" in map(requirement_name, extras["jax"])
    everything = {requirement_name(r) for name, reqs in extras.items() if name != "all" for r in reqs}
    assert set(FRAMEWORKS) <= everything
    assert extras["all"] == [f"groupnorm[{','.join(sorted(set(extras) - {'all'}, key=list(extras).index))}]"]


def test_package_is_typed():
    assert (ROOT / "src" / "groupnorm" / "py.typed").exists()


def test_development_pins_keep_the_cpu_torch_wheel():
    constraints = (ROOT / "requirements" / "constraints.txt").read_text().split()
    assert "torch==2.13.0" in constraints


def test_wheel_ships_the_kernel_source(tmp_path: Path) -> None:
    """The torch backend compiles its CPU kernel from the installed source: the wheel must carry it."""
    import subprocess
    import sys
    import zipfile

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("groupnorm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "groupnorm/backends/_cpu_kernel.c" in names
    assert "groupnorm/py.typed" in names
