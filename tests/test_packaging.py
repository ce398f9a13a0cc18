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
