"""Find, or fetch from the package registry, the frameworks' own GroupNorm test files for the installed
Keras and Flax versions.

Keras's wheel ships ``keras/src/layers/normalization/group_normalization_test.py``; Flax's wheel ships no
tests, but its source distribution (sdist) on PyPI does. ``python tests/fetch_upstream.py`` downloads
the sdist of the *installed* version with pip (``pip download --no-deps --no-binary :all:``, the package
registry only) and extracts just the test files into the cache directory (``GROUPNORM_UPSTREAM_DIR``, by
default ``.cache/upstream`` in the checkout), where ``tests/test_upstream.py`` finds them. It does the
same for Keras if the installed wheel lacks its test file. Nothing is downloaded for files already there.

This module also serves the tests: :func:`upstream_files` says where each file is (or None), and
imports no framework.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: the test files, by (distribution, path inside its sdist or installed package)
FILES: dict[str, tuple[str, str]] = {
    "keras": ("keras", "keras/src/layers/normalization/group_normalization_test.py"),
    "flax-nnx": ("flax", "tests/nnx/nn/normalization_test.py"),
    "flax-linen": ("flax", "tests/linen/linen_test.py"),
}

#: set to 1 (as ``make test`` does) to fail, not skip, where a file is missing
REQUIRE_ENV = "GROUPNORM_REQUIRE_UPSTREAM"


def cache_dir() -> Path:
    return Path(os.environ.get("GROUPNORM_UPSTREAM_DIR", ROOT / ".cache" / "upstream"))


def _installed(distribution: str, path: str) -> Path | None:
    """``path`` (``keras/...``) in the installed package, found without importing it."""
    package, _, rest = path.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    candidate = Path(spec.origin).parent / rest
    return candidate if candidate.is_file() else None


def _cached(distribution: str, path: str) -> Path:
    version = importlib.metadata.version(distribution)
    return cache_dir() / f"{distribution}-{version}" / path


def upstream_files() -> dict[str, Path | None]:
    """Each suite's test file for the installed versions: in the installed package, else in the cache,
    else None."""
    found: dict[str, Path | None] = {}
    for suite, (distribution, path) in FILES.items():
        try:
            cached = _cached(distribution, path)
        except importlib.metadata.PackageNotFoundError:
            found[suite] = None
            continue
        found[suite] = _installed(distribution, path) or (cached if cached.is_file() else None)
    return found


def require(suite: str) -> Path:
    """The suite's test file; where there is none, skip the calling test (fail if ``REQUIRE_ENV`` is 1)."""
    import pytest

    found = upstream_files()[suite]
    if found is None:
        distribution, path = FILES[suite]
        reason = (
            f"{distribution}'s {path} is neither in the installed package nor in {cache_dir()}: "
            "run `python tests/fetch_upstream.py` to fetch it from the package registry"
        )
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def fetch(distribution: str, paths: list[str]) -> None:
    """Download ``distribution``'s sdist (installed version) and extract ``paths`` into the cache."""
    version = importlib.metadata.version(distribution)
    target = cache_dir() / f"{distribution}-{version}"
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*command, f"{distribution}=={version}", "-d", tmp], check=True)
        (archive,) = Path(tmp).glob(f"{distribution}-*.tar.gz")
        with tarfile.open(archive) as tar:
            prefix = f"{distribution}-{version}/"
            for path in paths:
                member = tar.getmember(prefix + path)
                source = tar.extractfile(member)
                assert source is not None, member.name
                out = target / path
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(source.read())
                print(f"fetched {out}")


def main() -> int:
    missing: dict[str, list[str]] = {}
    for suite, found in upstream_files().items():
        if found is None:
            distribution, path = FILES[suite]
            missing.setdefault(distribution, []).append(path)
    for distribution, paths in missing.items():
        fetch(distribution, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
