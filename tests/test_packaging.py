"""The distribution: metadata, a plain install that pulls no framework, an extra per framework, and the
contents of the source distribution (everything needed to build, test and document) and of the wheel (the
package alone), both built out of the source tree."""

from __future__ import annotations

import ast
import email.parser
import email.policy
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from groupnorm.cli import BENCH_FRAMEWORKS, DEMO, PLOT

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "tensorflow", "tf-keras", "keras", "jax", "flax")
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
#: native sources the backends compile on first use; the wheel must carry them
NATIVE_SUFFIXES = (".c", ".cc", ".cpp", ".h", ".hpp")


def pyproject() -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())  # type: ignore[no-any-return]


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()


def source_version() -> str:
    """``groupnorm.__version__`` as written in the source (a literal, read without importing)."""
    tree = ast.parse((ROOT / "src" / "groupnorm" / "__init__.py").read_text())
    (value,) = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
        and isinstance(node.value, ast.Constant)
    ]
    assert isinstance(value, str)
    return value


def test_plain_install_needs_only_numpy() -> None:
    project = pyproject()["project"]
    assert [requirement_name(r) for r in project["dependencies"]] == ["numpy"]
    assert project["requires-python"] == ">=3.10"


def test_each_framework_has_an_extra_and_all_has_every_one() -> None:
    extras = pyproject()["project"]["optional-dependencies"]
    assert {"torch", "tf", "jax", "all"} <= set(extras)
    assert "torch" in map(requirement_name, extras["torch"])
    assert "tensorflow" in map(requirement_name, extras["tf"])
    assert "jax" in map(requirement_name, extras["jax"])
    everything = {requirement_name(r) for name, reqs in extras.items() if name != "all" for r in reqs}
    assert set(FRAMEWORKS) <= everything
    assert extras["all"] == [f"groupnorm[{','.join(sorted(set(extras) - {'all'}, key=list(extras).index))}]"]


def test_the_extras_the_command_names_install_what_it_needs() -> None:
    extras = pyproject()["project"]["optional-dependencies"]
    for needs in (DEMO, PLOT, *BENCH_FRAMEWORKS.values()):
        provided = {requirement_name(r) for extra in needs.extras for r in extras[extra]}
        assert set(needs.modules) <= provided, needs


def test_license_and_its_metadata() -> None:
    project = pyproject()["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("Copyright 2026 The groupnorm developers\n")
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    # PEP 639: with a license expression, a "License ::" classifier is an error for the build backend
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]


def test_classifiers_name_every_supported_python_and_the_platform() -> None:
    project = pyproject()["project"]
    classifiers = set(project["classifiers"])
    assert {f"Programming Language :: Python :: {v}" for v in PYTHONS} <= classifiers
    versions = {
        c.rsplit(" :: ", 1)[1] for c in classifiers if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    assert min(versions, key=lambda v: int(v.split(".")[1])) == project["requires-python"].removeprefix(">=")
    assert any(c.startswith("Operating System ::") for c in classifiers)
    assert any(c.startswith("Topic ::") for c in classifiers)
    assert "Typing :: Typed" in classifiers


def test_project_urls_are_absolute() -> None:
    urls = pyproject()["project"]["urls"]
    assert urls
    for label, url in urls.items():
        assert len(label) <= 32, label  # the length package indexes show (PEP 753)
        assert re.fullmatch(r"https://[\w.-]+\.[a-z]{2,}/\S*", url), url


def test_the_version_is_written_once() -> None:
    config = pyproject()
    assert "version" not in config["project"]
    assert "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "groupnorm.__version__"}
    version = source_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", version)
    elsewhere = [p for p in (ROOT / "src").rglob("*.py") if p.name != "__init__.py" and version in p.read_text()]
    assert not elsewhere


@pytest.mark.skipif(not os.environ.get("GROUPNORM_TEST_INSTALLED"), reason="run by the NumPy-only check")
def test_the_installed_package_is_under_test() -> None:
    """The NumPy-only check tests the package pip installed, not the checkout's sources."""
    import groupnorm

    assert (ROOT / "src") not in Path(groupnorm.__file__).resolve().parents
    assert Path(groupnorm.__file__).resolve().parent.parent.name in ("site-packages", "dist-packages")


def test_package_is_typed() -> None:
    assert (ROOT / "src" / "groupnorm" / "py.typed").exists()


def test_development_pins_keep_the_cpu_torch_wheel() -> None:
    constraints = (ROOT / "requirements" / "constraints.txt").read_text().split()
    assert "torch==2.13.0" in constraints


def test_readme_renders_on_a_package_index() -> None:
    """A package index shows README.md as the project's description, away from the repository: a link or
    image relative to the checkout would be broken there (images in the sdist are not served either)."""
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)", readme) + re.findall(r"^\[[^\]]+\]:\s*(\S+)", readme, re.M)
    targets += re.findall(r"<(?:img|a)\b[^>]*?(?:src|href)=\"([^\"]+)\"", readme)
    relative = [t for t in targets if not re.match(r"https?://", t)]
    assert not relative


# -- the built distributions ---------------------------------------------------------------------------------

#: paths that are never part of the source: environments, caches, build outputs
IGNORED = re.compile(
    r"(^|/)(\.git|\.venv[^/]*|__pycache__|\.pytest_cache|\.mypy_cache|\.ruff_cache|\.hypothesis|build|dist|site)(/|$)"
    r"|\.egg-info(/|$)|\.py[cod]$|\.so$"
)


def source_files() -> list[str]:
    """The checkout's files (relative, POSIX): git's list of tracked and unignored files where this is a
    git checkout, else (an unpacked sdist) every file but environments, caches and build outputs."""
    if shutil.which("git") and (ROOT / ".git").exists():
        done = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        names = [n for n in done.stdout.decode().split("\0") if n and (ROOT / n).is_file()]
    else:
        names = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file()]
    return sorted(n for n in names if not IGNORED.search(n))


def checkout_state() -> tuple[str, list[str]]:
    """What a build in the checkout would change: git's status and any build output directory."""
    status = ""
    if shutil.which("git") and (ROOT / ".git").exists():
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    outputs = [p.name for p in (ROOT / "build", ROOT / "dist") if p.exists()]
    outputs += [p.name for p in (ROOT / "src").glob("*.egg-info")]
    return status, sorted(outputs)


@dataclass
class Dists:
    sources: list[str]
    sdist: list[str]
    wheel: list[str]
    wheel_path: Path
    top: str


def build(backend_call: str, source: Path, out: Path) -> Path:
    """Run a PEP 517 hook of setuptools in ``source`` (no build isolation); the one file it writes."""
    out.mkdir()
    script = f"import sys, setuptools.build_meta as b; b.{backend_call}(sys.argv[1])"
    done = subprocess.run(
        [sys.executable, "-c", script, str(out)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (made,) = out.iterdir()
    return made


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    """The sdist built from a copy of the checkout, and the wheel built from that sdist (as pip does)."""
    from importlib.metadata import version

    if int(version("setuptools").split(".")[0]) < 77:
        pytest.skip("building needs setuptools>=77 (the build requirement) in this environment")
    before = checkout_state()
    tmp = tmp_path_factory.mktemp("dists")
    sources = source_files()
    copy = tmp / "checkout"
    for name in sources:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    sdist = build("build_sdist", copy, tmp / "sdist")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        top = members[0].name.split("/")[0]
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12, 3.11.4 and later
            tar.extractall(tmp / "unpacked", filter="data")
        else:
            tar.extractall(tmp / "unpacked")
    wheel = build("build_wheel", tmp / "unpacked" / top, tmp / "wheel")
    assert checkout_state() == before  # nothing was built in the checkout
    return Dists(
        sources=sources,
        sdist=sorted(m.name.split("/", 1)[1] for m in members),
        wheel=sorted(zipfile.ZipFile(wheel).namelist()),
        wheel_path=wheel,
        top=top,
    )


def test_sdist_holds_what_building_testing_and_documenting_need(dists: Dists) -> None:
    assert dists.top == f"groupnorm-{source_version()}"
    needed = {"LICENSE", "README.md", "pyproject.toml", "MANIFEST.in", "Makefile", "mkdocs.yml", ".ci/run"}
    needed |= {n for n in dists.sources if n.startswith(("src/groupnorm/", "tests/", "docs/", "requirements/"))}
    for helper in ("tests/support.py", "tests/tf_support.py", "tests/keras_backend_check.py", "docs/demo.md"):
        assert helper in needed
    assert needed <= set(dists.sdist), sorted(needed - set(dists.sdist))
    # and nothing else: the metadata setuptools writes, and no stray files of the checkout
    extra = {n for n in set(dists.sdist) - needed if not n.startswith("src/groupnorm.egg-info/")}
    assert extra <= {"PKG-INFO", "setup.cfg"}, sorted(extra)


def test_wheel_holds_the_package_alone(dists: Dists) -> None:
    package = {n.removeprefix("src/") for n in dists.sources if n.startswith("src/groupnorm/")}
    assert {"groupnorm/py.typed", "groupnorm/backends/torch/_cpu_kernel.c", "groupnorm/cli.py"} <= package
    assert {n for n in package if n.endswith(NATIVE_SUFFIXES)} >= {
        "groupnorm/backends/torch/_cpu_kernel.c",
        "groupnorm/backends/torch/_ops.cpp",
    }
    info = f"groupnorm-{source_version()}.dist-info/"
    assert set(dists.wheel) - package == {
        info + n for n in ("METADATA", "WHEEL", "RECORD", "entry_points.txt", "top_level.txt", "licenses/LICENSE")
    }
    assert package <= set(dists.wheel), sorted(package - set(dists.wheel))
    with zipfile.ZipFile(dists.wheel_path) as whl:
        assert whl.read(info + "licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        assert "groupnorm = groupnorm.cli:main" in whl.read(info + "entry_points.txt").decode()
        assert "Root-Is-Purelib: true" in whl.read(info + "WHEEL").decode()


def test_wheel_metadata(dists: Dists) -> None:
    with zipfile.ZipFile(dists.wheel_path) as whl:
        text = whl.read(f"groupnorm-{source_version()}.dist-info/METADATA").decode()
    meta = email.parser.Parser(policy=email.policy.compat32).parsestr(text)
    assert meta["Name"] == "groupnorm"
    assert meta["Version"] == source_version()
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["Requires-Python"] == ">=3.10"
    assert {f"Programming Language :: Python :: {v}" for v in PYTHONS} <= set(meta.get_all("Classifier"))
    urls = dict(u.rsplit(", ", 1) for u in meta.get_all("Project-URL"))
    assert urls == pyproject()["project"]["urls"]
    assert set(meta.get_all("Provides-Extra")) == set(pyproject()["project"]["optional-dependencies"])
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload().strip() == (ROOT / "README.md").read_text().strip()
