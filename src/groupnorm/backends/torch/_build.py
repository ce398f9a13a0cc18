"""Builds groupnorm's compiled CPU code on first use, caches it, and loads it only once it is checked.

Two libraries are built from the sources beside this file:

- ``ops``: ``_ops.cpp`` (the operators' C++ kernels, against torch's headers) with ``_cpu_kernel.c``,
  loaded into torch's dispatcher; it makes a call cost what the dispatcher costs.
- ``kernel``: ``_cpu_kernel.c`` alone (no headers), loaded with :mod:`ctypes`: the kernel for the Python
  operator kernels, where the C++ library cannot be built but a C compiler exists.

The cache is per user: ``$GROUPNORM_CACHE_DIR`` (``~`` expanded), else ``$XDG_CACHE_HOME/groupnorm`` where
that is an absolute path (a relative one is ignored, as the XDG specification says), else
``~/.cache/groupnorm``, else (no home directory) a per-user directory in the system's temporary directory.
A library's name holds a hash of everything it depends on (sources, flags, compiler, CPU, torch); beside it
a ``.sha256`` file, written last, records the bytes that were built. A library whose bytes do not match is
never loaded: it is rebuilt once and replaced atomically. A failed build is remembered (a ``.failed`` file
with its reason, for that same hash), so later processes fall back at once instead of building again.
Builds are serialised between processes by a lock file, and temporary files never outlive their build.

Where nothing can be built, the callers run the exact composite instead; :func:`load` and
:func:`load_ops` warn once, naming the reason. ``GROUPNORM_CPU_KERNEL=0`` turns both off.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["cache_dir", "load", "load_ops"]

HERE = Path(__file__).parent
KERNEL_SOURCE = HERE / "_cpu_kernel.c"
OPS_SOURCE = HERE / "_ops.cpp"

#: flags for the C kernel, tried in order until one set builds: the fastest first
_C_FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("-march=native", "-fopenmp"),
    ("-fopenmp",),
    ("-march=native", "-fopenmp-simd"),
    (),
)
_C_FLAGS = ("-O3", "-std=c11", "-fPIC")

_lock = threading.Lock()
_loaded: dict[str, object] = {}  # name -> the library, or None once it is known not to load
_TIMEOUT = 600


class BuildError(Exception):
    """Why a library could not be built or loaded."""


def cache_dir() -> Path:
    """Where built libraries are cached (see the module's docstring)."""
    explicit = os.environ.get("GROUPNORM_CACHE_DIR")
    if explicit:
        return Path(os.path.expanduser(explicit))
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "groupnorm"
    home = os.path.expanduser("~")
    if home != "~" and os.path.isabs(home):
        return Path(home) / ".cache" / "groupnorm"
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"groupnorm-{uid}"


def _compiler(kind: str) -> str | None:
    names = ("CC", "cc", "gcc", "clang") if kind == "c" else ("CXX", "c++", "g++", "clang++")
    for name in (os.environ.get(names[0]), *names[1:]):
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


def _version(cc: str) -> str:
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout


def _run(command: list[str]) -> str | None:
    """Runs a compiler; None, or the tail of why it failed."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    return None if done.returncode == 0 else (done.stderr.strip()[-400:] or f"exit status {done.returncode}")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _valid(target: Path) -> bool:
    """Whether ``target`` holds exactly the bytes its build recorded (a damaged or foreign file does not)."""
    record = target.with_name(target.name + ".sha256")
    try:
        expected = record.read_text().strip()
        return target.stat().st_size > 0 and _digest(target) == expected
    except OSError:
        return False


@contextlib.contextmanager
def _build_lock(directory: Path, name: str) -> Iterator[None]:
    path = directory / f"{name}.lock"
    with open(path, "a+") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no locking here: concurrent builds still each install a whole file
            pass
        yield


def _install(directory: Path, target: Path, build: object) -> None:
    """Builds into a temporary file (``build(path) -> None | reason``), then moves it and its record into
    place atomically; the temporary files go whatever happens."""
    fd, tmp_name = tempfile.mkstemp(suffix=".so.tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        failure = build(tmp)  # type: ignore[operator]
        if failure is not None:
            raise BuildError(failure)
        record = tmp.with_name(tmp.name + ".sha256")
        record.write_text(_digest(tmp))
        os.replace(tmp, target)
        os.replace(record, target.with_name(target.name + ".sha256"))
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".sha256")):
            with contextlib.suppress(OSError):
                leftover.unlink()


def _cached(name: str, key_parts: list[bytes], build: object) -> Path:
    """The checked library ``name`` for these inputs: from the cache, or built now (once per process and
    per failure). Raises BuildError with the reason."""
    key = hashlib.sha256()
    for part in key_parts:
        key.update(part)
    digest = key.hexdigest()[:20]
    try:
        directory = cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"the cache directory {cache_dir()} cannot be used: {e}") from None
    target = directory / f"{name}-{digest}.so"
    failed = target.with_name(target.name + ".failed")
    if _valid(target):
        return target
    if failed.exists():
        raise BuildError(f"an earlier build failed (remembered in {failed}): {failed.read_text()[-300:]}")
    try:
        with _build_lock(directory, name):
            if _valid(target):  # another process built it meanwhile
                return target
            try:
                _install(directory, target, build)
            except BuildError as e:
                with contextlib.suppress(OSError):
                    failed.write_text(str(e))
                raise
    except OSError as e:
        raise BuildError(f"the cache directory {directory} cannot be written: {e}") from None
    return target


def _base_key(cc: str) -> list[bytes]:
    return [
        KERNEL_SOURCE.read_bytes(),
        repr((_C_FLAG_SETS, _C_FLAG_SETS_IN_TORCH, _C_FLAGS)).encode(),
        _version(cc).encode(),
        (_cpu_identity() + platform.machine()).encode(),
    ]


#: flags for the C kernel inside the C++ operators: no OpenMP runtime of its own (torch's thread pool runs
#: its parallel loops)
_C_FLAG_SETS_IN_TORCH: tuple[tuple[str, ...], ...] = (("-march=native", "-fopenmp-simd"), ("-fopenmp-simd",), ())


#: flags that let the C++ operators' ``at::parallel_for`` run on torch's thread pool, tried first: torch's
#: parallel loop is an OpenMP region compiled into the caller (without ``-fopenmp`` it runs on one thread);
#: the OpenMP runtime it links is the one torch has already loaded (the same ``libgomp.so.1``)
_CXX_PARALLEL_FLAGS: tuple[tuple[str, ...], ...] = (("-fopenmp",), ())


def _first_that_builds(
    flag_sets: tuple[tuple[str, ...], ...], command: Callable[[tuple[str, ...]], list[str]]
) -> str | None:
    """Runs ``command(flags)`` for each flag set in turn until one builds: None, or every set's failure."""
    errors = []
    for flags in flag_sets:
        failure = _run(command(flags))
        if failure is None:
            return None
        errors.append(f"{' '.join(flags) or 'no extra flags'}: {failure}")
    return "; ".join(errors)


def _compile_kernel(cc: str, output: Path, shared: bool) -> str | None:
    """The C kernel into ``output`` (a shared library, or an object file for the C++ operators), with the
    first flag set that builds."""
    extra = ["-shared", "-lm"] if shared else ["-c"]
    return _first_that_builds(
        _C_FLAG_SETS if shared else _C_FLAG_SETS_IN_TORCH,
        lambda flags: [cc, *_C_FLAGS, *flags, str(KERNEL_SOURCE), "-o", str(output), *extra],
    )


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    lib.groupnorm_forward_f32.argtypes = [p, p, i64, i64, i64, i64, i64, p, p, f64, i32, p, p, p, i32]
    lib.groupnorm_forward_f32.restype = i32
    lib.groupnorm_backward_f32.argtypes = [p, p, p, i64, i64, i64, i64, i64, p, p, p, p, p, p, i32]
    lib.groupnorm_backward_f32.restype = i32
    lib.groupnorm_prefer_huge_pages.argtypes = [p, i64]
    lib.groupnorm_prefer_huge_pages.restype = None
    return lib


def _turned_off() -> bool:
    return os.environ.get("GROUPNORM_CPU_KERNEL", "1") == "0"


def _kernel() -> ctypes.CDLL:
    if _turned_off():
        raise BuildError("turned off by GROUPNORM_CPU_KERNEL=0")
    if not sys.platform.startswith(("linux", "darwin")):
        raise BuildError(f"not built on {sys.platform}")
    cc = _compiler("c")
    if cc is None:
        raise BuildError("no C compiler found (set CC to use one)")
    target = _cached("cpu_kernel", _base_key(cc), lambda out: _compile_kernel(cc, out, shared=True))
    try:
        lib = ctypes.CDLL(str(target))
        return _declare(lib)
    except (OSError, AttributeError) as e:
        raise BuildError(f"loading {target} failed: {e}") from None


def _ops() -> Path:
    if _turned_off():
        raise BuildError("turned off by GROUPNORM_CPU_KERNEL=0")
    if not sys.platform.startswith("linux"):
        raise BuildError(f"not built on {sys.platform}")
    cc, cxx = _compiler("c"), _compiler("c++")
    if cc is None or cxx is None:
        raise BuildError("no C and C++ compiler found (set CC and CXX to use them)")
    import torch
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = cpp_extension.library_paths()
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    cxx_flags = ["-O2", "-std=c++17", "-fPIC", "-w", abi, *includes]

    def build(out: Path) -> str | None:
        with tempfile.TemporaryDirectory(dir=out.parent) as work:
            obj = Path(work) / "kernel.o"
            failure = _compile_kernel(cc, obj, shared=False)
            if failure is not None:
                return f"the C kernel: {failure}"
            link = [f"-L{p}" for p in libs] + [f"-Wl,-rpath,{p}" for p in libs]
            return _first_that_builds(
                _CXX_PARALLEL_FLAGS,
                lambda parallel: [cxx, *cxx_flags, *parallel, "-shared", str(OPS_SOURCE), str(obj), "-o", str(out),
                                  *link, "-lc10", "-ltorch_cpu", "-ltorch", "-lm"],
            )  # fmt: skip

    key = [*_base_key(cc), OPS_SOURCE.read_bytes(), _version(cxx).encode(), torch.__version__.encode()]
    key.append(repr((cxx_flags, _CXX_PARALLEL_FLAGS)).encode())
    return _cached("ops", key, build)


def _once(name: str, make: object) -> object:
    if name in _loaded:
        return _loaded[name]
    with _lock:
        if name not in _loaded:
            try:
                _loaded[name] = make()  # type: ignore[operator]
            except BuildError as e:
                if "GROUPNORM_CPU_KERNEL=0" not in str(e):
                    what = "C++ operators are" if name == "ops" else "CPU kernel is"
                    warnings.warn(
                        f"groupnorm: the compiled {what} unavailable ({e}); using the exact but slower path",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                _loaded[name] = None
    return _loaded[name]


def load() -> ctypes.CDLL | None:
    """The C kernel's library (ctypes), built on the first call; None where it cannot be (warned once)."""
    return _once("kernel", _kernel)  # type: ignore[return-value]


def load_ops() -> Path | None:
    """The C++ operators' library, built on the first call, for ``torch.ops.load_library``; None where it
    cannot be (warned once)."""
    return _once("ops", _ops)  # type: ignore[return-value]
