"""Builds and loads groupnorm's CPU kernels (``_cpu_kernel.c``), on first use.

The kernels are plain C (no Python or torch headers), so they build in about a second with the system's C
compiler and are loaded with :mod:`ctypes`, which releases the GIL while they run. The shared library is
cached per user, keyed by the source, the compiler and the CPU (it is built for the CPU it runs on), in
``$GROUPNORM_CACHE_DIR``, else ``$XDG_CACHE_HOME/groupnorm``, else ``~/.cache/groupnorm``.

Where no C compiler is found or the build fails, :func:`load` returns None (with one warning saying why)
and the caller runs its exact native-op path instead. ``GROUPNORM_CPU_KERNEL=0`` turns the kernels off.
OpenMP is used where the compiler has it; built with ``-fopenmp`` the library shares the OpenMP runtime
that torch has already loaded (it is found by its soname).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("_cpu_kernel.c")

#: compiler flags, tried in order until one set builds: the fastest first
_FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("-march=native", "-fopenmp"),
    ("-fopenmp",),
    ("-march=native", "-fopenmp-simd"),
    (),
)
_COMMON_FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC")

_lock = threading.Lock()
_loaded: list[ctypes.CDLL | None] = []  # empty until the first load; then the library, or None


def _cache_dir() -> Path:
    explicit = os.environ.get("GROUPNORM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "groupnorm"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler_version(cc: str) -> str:
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout


def _build(cc: str, target: Path) -> str | None:
    """Compile the source into ``target``; returns None, or why every flag set failed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in _FLAG_SETS:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run(
                [cc, *_COMMON_FLAGS, *flags, str(SOURCE), "-o", tmp, "-lm"],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            if done.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent builders each install a whole library
                return None
            errors.append(f"{' '.join(flags) or 'no extra flags'}: {done.stderr.strip()[-300:]}")
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(str(e))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return "; ".join(errors)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    lib.groupnorm_forward_f32.argtypes = [p, p, i64, i64, i64, i64, i64, p, p, f64, i32, p, p, p, i32]
    lib.groupnorm_forward_f32.restype = i32
    lib.groupnorm_backward_f32.argtypes = [p, p, p, i64, i64, i64, i64, i64, p, p, p, p, p, p, i32]
    lib.groupnorm_backward_f32.restype = i32
    lib.groupnorm_prefer_huge_pages.argtypes = [p, i64]
    lib.groupnorm_prefer_huge_pages.restype = None
    return lib


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("GROUPNORM_CPU_KERNEL", "1") == "0":
        return None, "turned off by GROUPNORM_CPU_KERNEL=0"
    if not sys.platform.startswith(("linux", "darwin")):
        return None, f"not built on {sys.platform}"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC to use one)"
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), repr((*_FLAG_SETS, _COMMON_FLAGS)).encode(), _compiler_version(cc).encode()):
        key.update(part)
    key.update((_cpu_identity() + platform.machine()).encode())
    target = _cache_dir() / f"cpu_kernel-{key.hexdigest()[:20]}.so"
    if not target.exists():
        try:
            failure = _build(cc, target)
        except OSError as e:  # e.g. the cache directory cannot be created
            failure = str(e)
        if failure is not None:
            return None, f"the build with {cc} failed: {failure}"
    try:
        return _declare(ctypes.CDLL(str(target))), ""
    except OSError as e:
        return None, f"loading {target} failed: {e}"


def load() -> ctypes.CDLL | None:
    """The kernels' library, built on the first call; None where it cannot be built (warned once)."""
    if _loaded:
        return _loaded[0]
    with _lock:
        if not _loaded:
            lib, why = _load()
            if lib is None and "GROUPNORM_CPU_KERNEL=0" not in why:
                warnings.warn(
                    f"groupnorm: the CPU kernel is unavailable ({why}); using the exact but slower path",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _loaded.append(lib)
    return _loaded[0]
