"""The compiled CPU code of the torch backend (the C++ operators and the C kernel): float32 values and
gradients against float64, its layouts, its independence of the thread count, the build cache, and the
exact fallback where it cannot be built."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import groupnorm.numpy
import groupnorm.torch as gt
from groupnorm.backends import torch as backend
from groupnorm.backends.torch import _build, _composite, _cpu, _ops
from support import hard_data, reference_group_norm


def test_kernel_builds_here() -> None:
    """CI has C and C++ compilers: code that silently fell back would leave the fast path untested."""
    assert _ops.CPP, "the C++ operators did not load"
    assert _build.load() is not None


@pytest.fixture
def kernel_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every float32 call must run the compiled kernel: the composite's forward and backward refuse."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the composite ran where the kernel should have")

    monkeypatch.setattr(_composite, "statistics", refuse)
    monkeypatch.setattr(_composite, "backward", refuse)


def _silu(y: np.ndarray) -> np.ndarray:
    return y / (1 + np.exp(-y))


def _relu(y: np.ndarray) -> np.ndarray:
    return np.maximum(y, 0)


#: (shape, groups, channels_axis, reduction_axes, memory format): the layouts the kernel takes
LAYOUTS = {
    "nchw": ((2, 16, 6, 10), 4, 1, (2, 3), torch.contiguous_format),
    "nchw-channels-last": ((2, 16, 6, 10), 4, 1, (2, 3), torch.channels_last),
    "nhwc": ((2, 6, 10, 16), 4, -1, (1, 2), torch.contiguous_format),
    "sequence-nlc": ((3, 17, 12), 3, -1, (1,), torch.contiguous_format),
    "features-nc": ((5, 12), 6, 1, (), torch.contiguous_format),
    "single-sample-nhwc": ((80, 60, 64), 2, -1, (0, 1), torch.contiguous_format),  # rows split across tasks
    # channels innermost and small enough to stay in cache: tasks of whole groups, groups split across tasks
    "channels-last-groups-split": ((2, 640, 8, 8), 32, 1, (2, 3), torch.channels_last),
    "single-sample-nchw": ((64, 40, 30), 8, 0, (1, 2), torch.contiguous_format),  # groups split across tasks
    "one-group": ((2, 8, 5, 7), 1, 1, (2, 3), torch.channels_last),
    "nchw-rows-shorter-than-the-corner": ((2, 16, 2, 3), 4, 1, (2, 3), torch.contiguous_format),
    "nchw-odd-runs": ((3, 12, 3, 5), 4, 1, (2, 3), torch.contiguous_format),  # group runs of 45 elements
    "features-many-rows": ((2500, 64), 8, 1, (), torch.contiguous_format),  # rows of K in three chunks
    "sequence-many-rows": ((260, 512, 9), 32, 1, (2,), torch.contiguous_format),  # three chunks, shifted
}


@pytest.mark.usefixtures("kernel_only")
@pytest.mark.parametrize("activation", [None, "silu", "relu"])
@pytest.mark.parametrize("mean_over_std", [0.0, 1e4])
@pytest.mark.parametrize("name", LAYOUTS)
def test_values_and_gradients_match_float64(name: str, mean_over_std: float, activation: str | None) -> None:
    shape, groups, axis, reduce, memory_format = LAYOUTS[name]
    channels = shape[axis]
    rng = np.random.default_rng(len(name))
    x = hard_data(shape, axis, mean_over_std, dtype=np.float32)
    gamma = (1 + 0.5 * rng.standard_normal(channels)).astype(np.float32)
    beta = rng.standard_normal(channels).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    xt = torch.from_numpy(x).contiguous(memory_format=memory_format).requires_grad_()
    g, b = torch.from_numpy(gamma).requires_grad_(), torch.from_numpy(beta).requires_grad_()
    kwargs = {"channels_axis": axis, "reduction_axes": reduce}
    y = gt.group_norm(xt, groups, g, b, activation=activation, **kwargs)
    assert y.dtype == torch.float32
    assert y.is_contiguous(memory_format=memory_format)
    want = reference_group_norm(x, groups, axis, reduce, gamma, beta, 1e-5)
    want = {"silu": _silu, "relu": _relu, None: lambda v: v}[activation](want)
    assert np.abs(y.detach().double().numpy() - want).max() <= 1e-5

    y.backward(torch.from_numpy(dy))
    grads = groupnorm.numpy.vjp(
        x.astype(np.float64), dy.astype(np.float64), groups, axis, reduce,
        gamma=gamma.astype(np.float64), beta=beta.astype(np.float64), epsilon=1e-5, activation_fn=activation,
    )  # fmt: skip
    for got, expected in ((xt.grad, grads.inputs), (g.grad, grads.gamma), (b.grad, grads.beta)):
        assert got is not None and got.dtype == torch.float32
        # float32 rounding of terms of order gamma * dy * rstd (about 1 here) that cancel in the result
        scale = max(np.abs(expected).max(), 1.0)
        assert np.abs(got.double().numpy() - expected).max() <= 1e-5 * scale


@pytest.mark.usefixtures("kernel_only")
@pytest.mark.parametrize("mean", [0.0, 0.5, 3.0, 1e4])
@pytest.mark.parametrize("name", ["nchw-channels-last", "nhwc", "channels-last-groups-split"])
def test_input_gradient_along_the_output_is_exact(name: str, mean: float) -> None:
    """A cotangent along the normalized output (``dy = y + noise``, as a loss near its optimum gives) makes
    the gradient's per-group terms as large as they get, so that a rounding that grows with the shift (a
    group mean far from zero, against a spread of 1) shows: the kernel's values and input gradient against
    float64."""
    shape, groups, axis, reduce, memory_format = LAYOUTS[name]
    rng = np.random.default_rng(3)
    x = (mean + rng.standard_normal(shape)).astype(np.float32)
    want_y = reference_group_norm(x, groups, axis, reduce, epsilon=1e-5)
    dy = (want_y + rng.standard_normal(shape)).astype(np.float32)
    xt = torch.from_numpy(x).contiguous(memory_format=memory_format).requires_grad_()
    y = gt.group_norm(xt, groups, channels_axis=axis, reduction_axes=reduce)
    y.backward(torch.from_numpy(dy))
    want = groupnorm.numpy.vjp(x.astype(np.float64), dy.astype(np.float64), groups, axis, reduce, epsilon=1e-5)
    assert xt.grad is not None
    assert np.abs(y.detach().double().numpy() - want_y).max() <= 1e-6 * np.abs(want_y).max()
    assert np.abs(xt.grad.double().numpy() - want.inputs).max() <= 1e-6 * np.abs(want.inputs).max()


@pytest.mark.usefixtures("kernel_only")
@pytest.mark.parametrize("affine", [True, False])
def test_without_parameters_and_without_shift(affine: bool) -> None:
    x = hard_data((3, 8, 9, 4), 1, 0.0, dtype=np.float32)
    m = gt.GroupNorm(2, 8, affine=affine, mean_close_to_zero=True)
    xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = m(xt)
    np.testing.assert_allclose(y.detach().numpy(), reference_group_norm(x, 2, 1, (2, 3), epsilon=1e-5), atol=1e-5)
    y.sum().backward()  # the gradient of a sum of normalized values is zero
    assert xt.grad is not None
    assert np.abs(xt.grad.numpy()).max() <= 1e-5


@pytest.mark.usefixtures("kernel_only")
@pytest.mark.parametrize(
    "shape",
    [(1, 32, 64, 48), (1, 64, 96, 48)],
    ids=["groups-split-across-tasks", "rows-split-across-tasks"],
)
def test_results_do_not_depend_on_the_thread_count(shape: tuple[int, ...]) -> None:
    x = torch.from_numpy(hard_data(shape, 1, 100.0, dtype=np.float32))
    x = x.contiguous(memory_format=torch.channels_last)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(gt.group_norm(x, 8))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])


def test_kernel_and_composite_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.from_numpy(hard_data((2, 32, 12, 10), 1, 1e3, dtype=np.float32))
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.linspace(0.5, 2, 32)
    fast = gt.group_norm(x, 8, w)
    monkeypatch.setattr(backend, "KERNELS", False)
    exact = gt.group_norm(x, 8, w)
    torch.testing.assert_close(fast, exact, atol=2e-6, rtol=0)


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache directory, and no library loaded yet in this process's bookkeeping."""
    monkeypatch.setenv("GROUPNORM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_build, "_loaded", {})
    return tmp_path


def test_builds_into_the_cache_directory(fresh_cache: Path) -> None:
    _build._kernel()
    names = sorted(p.name for p in fresh_cache.iterdir())
    assert [n.rsplit(".", 1)[-1] for n in names if not n.endswith(".lock")] == ["so", "sha256"]
    assert not [n for n in names if ".tmp" in n]  # no temporary file outlives its build


def _kernel_path() -> Path:
    """The C kernel's cached library, built where needed, without loading it (a library that is loaded
    must not be overwritten in place by the test itself)."""
    cc = _build._compiler("c")
    assert cc is not None
    return _build._cached("cpu_kernel", _build._base_key(cc), lambda out: _build._compile_kernel(cc, out, shared=True))


def test_a_damaged_library_is_never_loaded_and_is_rebuilt_once(fresh_cache: Path) -> None:
    lib = _kernel_path()
    good = lib.read_bytes()
    lib.write_bytes(good[: len(good) // 3])  # truncated: loading it would crash the process
    assert not _build._valid(lib)
    assert _kernel_path() == lib and _build._valid(lib)  # rebuilt (atomically)
    lib.write_bytes(b"\x7fELF not a library")  # a foreign file under the library's name
    assert not _build._valid(lib)
    assert _kernel_path() == lib and _build._valid(lib)
    _build._kernel()  # and the rebuilt library loads


def test_a_failed_build_is_remembered(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing(command: list[str]) -> str:
        calls.append(command)
        return "simulated compiler error"

    monkeypatch.setattr(_build, "_run", failing)
    with pytest.raises(_build.BuildError, match="simulated compiler error"):
        _build._kernel()
    tried = len(calls)
    with pytest.raises(_build.BuildError, match="an earlier build failed"):
        _build._kernel()
    assert len(calls) == tried  # not built again
    assert not [p for p in fresh_cache.iterdir() if ".tmp" in p.name]


def test_the_cache_directory_is_resolved_sanely(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GROUPNORM_CACHE_DIR", "~/somewhere")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _build.cache_dir() == tmp_path / "somewhere"
    monkeypatch.delenv("GROUPNORM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the XDG specification says
    assert _build.cache_dir() == tmp_path / ".cache" / "groupnorm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _build.cache_dir() == tmp_path / "xdg" / "groupnorm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("HOME")
    monkeypatch.setattr(os.path, "expanduser", lambda p: p)  # no home directory to be found
    directory = _build.cache_dir()
    assert directory.is_absolute() and directory.parent == Path(tempfile.gettempdir())


def test_an_unusable_cache_directory_is_named_as_such(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("GROUPNORM_CACHE_DIR", str(blocker / "sub"))
    with pytest.raises(_build.BuildError, match="cache directory"):
        _build._kernel()


def test_without_a_compiler_the_exact_path_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GROUPNORM_CACHE_DIR", "/nonexistent/never-built")
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(_build, "_loaded", {})
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert _build.load() is None
    assert _build.load() is None  # decided once, warned once
    x = hard_data((2, 16, 6, 10), 1, 1e4, dtype=np.float32)
    xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
    out, *_ = torch.ops.groupnorm._forward_python(xt, None, None, 4, 1, [2, 3], 1e-5, False, None, False)
    assert np.abs(out.double().numpy() - reference_group_norm(x, 4, 1, (2, 3), epsilon=1e-5)).max() <= 1e-5


def test_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GROUPNORM_CPU_KERNEL", "0")
    with pytest.raises(_build.BuildError, match="GROUPNORM_CPU_KERNEL=0"):
        _build._kernel()
    with pytest.raises(_build.BuildError, match="GROUPNORM_CPU_KERNEL=0"):
        _build._ops()


@pytest.mark.usefixtures("kernel_only")
def test_huge_page_hint_changes_nothing_but_speed(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.from_numpy(hard_data((4, 64, 64, 64), 1, 1e2, dtype=np.float32)).requires_grad_()  # 4 MiB
    dy = torch.randn(x.shape)
    results = []
    for hint in (True, False):
        monkeypatch.setattr(_cpu, "HUGE_PAGES", hint)
        x.grad = None
        y = gt.group_norm(x, 16)
        y.backward(dy)
        assert x.grad is not None
        results.append((y.detach(), x.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
