"""groupnorm's Triton kernels (groupnorm.backends.torch._triton) against float64 references.

Without a GPU the kernels run on CPU tensors in Triton's interpreter, which must be switched on before
Triton is imported: the cases run in two processes of their own (triton_check.py, started by one test),
so that this process and the other test modules keep the ordinary Triton. On a machine with a
CUDA device the GPU tests below run the same cases, and larger ones, on the device.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from groupnorm._plan import make_plan
from groupnorm.backends.torch import _triton
from support import run_python
from triton_cases import CASES, PATHS

TESTS = Path(__file__).resolve().parent
needs_triton = pytest.mark.skipif(not _triton.HAVE_TRITON, reason="Triton is not installed")
needs_cuda = pytest.mark.skipif(
    not (_triton.HAVE_TRITON and torch.cuda.is_available()), reason="needs Triton and a CUDA device"
)


def interpreted_results() -> dict[str, dict[str, Any]]:
    """Every case's results from Triton's interpreter, from two processes running side by side."""
    names = list(CASES)
    env = dict(os.environ, TRITON_INTERPRET="1", GROUPNORM_TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])
    script = str(TESTS / "triton_check.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, *names[i::2]], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    results: dict[str, dict[str, Any]] = {}
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
        for line in out.splitlines():
            result = json.loads(line)
            results[result["name"]] = result
    return results


def check_result(result: dict[str, Any]) -> None:
    """Every error within its tolerance (a ratio of at most 1), every shape, dtype and stride as promised."""
    assert result["available"] and result["supports"], result
    assert result["unchanged"], "the input was modified"
    for key in ("y_layout", "stats_layout", "grad_presence", "dx_layout", "dgamma_layout", "dbeta_layout"):
        if key in result:
            assert all(result[key]), (key, result[key])
    for key in ("y", "shift", "mean", "rstd", "dx", "dgamma", "dbeta"):
        if key in result:
            assert result[key] <= 1.0, (key, result[key])


@needs_triton
def test_interpreted_cases_match_float64() -> None:
    """All cases in one test (one pair of processes, also under pytest-xdist); every failing case is named."""
    results = interpreted_results()
    assert sorted(results) == sorted(CASES)
    failures = []
    for name, result in results.items():
        try:
            check_result(result)
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n".join(failures)


def test_split_cases_span_several_chunks_and_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """The split cases do split: groups over several chunks, chunks over several tiles, ragged last chunks."""
    from triton_check import SPLIT_SETTINGS, make_input

    for name, value in SPLIT_SETTINGS.items():
        monkeypatch.setattr(_triton, name, value)
    splits = []
    for case in CASES.values():
        if case.path != "split":
            continue
        x = make_input(case, torch.zeros(case.shape, dtype=torch.float64))
        plan = _plan(x, groups=case.groups, channels_axis=case.channels_axis, reduction_axes=case.reduction_axes)
        v = _triton._view(plan, x.shape, [x.stride(), _triton._out_strides(x)])
        assert v is not None and _triton._fused_tile(v) is None
        sp = _triton._split(v, x)
        splits.append((sp.chunks, sp.iterations, v.reduced % sp.chunk_rows != 0))
    assert any(chunks > 1 and iterations > 1 and ragged for chunks, iterations, ragged in splits)
    assert sum(chunks > 1 for chunks, _, _ in splits) >= len(splits) * 3 // 4


def test_every_path_layout_dtype_and_activation_is_covered() -> None:
    cases = list(CASES.values())
    for path in PATHS:
        on_path = [c for c in cases if c.path == path]
        assert {c.activation for c in on_path} == {None, "relu", "silu", "gelu"}
        assert {c.memory for c in on_path} == {"contiguous", "channels_last", "hcw", "strided"}
        assert {c.dtype for c in on_path} == {"float32", "float16", "bfloat16"}
    fused = [c for c in cases if c.path == "fused"]
    assert {(c.layout, c.dtype) for c in fused} >= {(c.layout, d) for c in cases for d in ("float32", "bfloat16")}


# ---------------------------------------------------------------------------------------------- host side


def _plan(x: torch.Tensor, **kwargs: Any) -> Any:
    return make_plan(tuple(x.shape), str(x.dtype).removeprefix("torch."), **kwargs)


@needs_triton
@pytest.mark.parametrize(
    ("ours", "theirs", "expected"),
    [("1", "1", "True"), ("1", None, "False"), (None, "1", "False"), ("0", "1", "False")],
)
def test_available_on_cpu_only_with_both_interpreter_switches(
    monkeypatch: pytest.MonkeyPatch, ours: str | None, theirs: str | None, expected: str
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("GROUPNORM_TRITON_INTERPRET", raising=False)
    env = {k: v for k, v in (("GROUPNORM_TRITON_INTERPRET", ours), ("TRITON_INTERPRET", theirs)) if v is not None}
    code = (
        "import torch; from groupnorm.backends.torch import _triton as t; print(t.available(torch.zeros(2, 4, 3, 3)))"
    )
    result = run_python("-c", code, **env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [expected]


@needs_triton
def test_not_available_on_cpu_when_triton_was_imported_before_the_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    # this process imported Triton without its interpreter: its kernels would not run on CPU tensors
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("GROUPNORM_TRITON_INTERPRET", "1")
    assert not _triton.available(torch.zeros(2, 4, 3, 3))
    assert _triton.available("not a tensor") is False  # type: ignore[arg-type]


def test_supports_the_layouts_and_dtypes_it_handles() -> None:
    nchw = torch.zeros(2, 8, 4, 5)
    plan = _plan(nchw, groups=4, channels_axis=1, reduction_axes=(2, 3))
    assert _triton.supports(plan, nchw)
    assert _triton.supports(plan, nchw.contiguous(memory_format=torch.channels_last))
    assert _triton.supports(plan, nchw.half()) and _triton.supports(plan, nchw.bfloat16())
    assert not _triton.supports(plan, nchw.double())  # the exact fallback's job
    assert not _triton.supports(plan, nchw.to(torch.int32))
    empty = torch.zeros(0, 8, 4, 5)
    assert not _triton.supports(_plan(empty, groups=4, channels_axis=1, reduction_axes=(2, 3)), empty)
    assert not _triton.supports(plan, torch.zeros(2, 8, 4))  # not the plan's rank
    # kept axes 0, 1 and 3 in three strided runs that cannot merge: (2, 3, C, 5, R) from a (5, 3, 2, C, R) tensor
    weird = torch.zeros(5, 3, 2, 4, 6).permute(2, 1, 3, 0, 4)
    assert not _triton.supports(_plan(weird, groups=2, channels_axis=2, reduction_axes=(4,)), weird)


def test_output_strides_follow_dense_inputs_only() -> None:
    x = torch.zeros(2, 8, 4, 5)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert _triton._out_strides(cl) == cl.stride()
    assert _triton._out_strides(x.permute(0, 2, 3, 1)) == x.permute(0, 2, 3, 1).stride()
    assert _triton._out_strides(x[..., ::2]) == (96, 12, 3, 1)  # (2, 8, 4, 3), contiguous
    assert _triton._out_strides(x[:1].expand(3, 8, 4, 5)) == (160, 20, 5, 1)


def test_view_merges_runs_only_where_every_tensor_allows() -> None:
    x = torch.zeros(2, 6, 3, 4, 4)  # per-frame statistics: kept (N, T), reduced (H, W)
    plan = _plan(x, groups=2, channels_axis=1, reduction_axes=(3, 4))
    v = _triton._view(plan, x.shape, [x.stride()])
    assert v is not None
    assert (v.kept, v.kept_inner, v.reduced, v.reduced_inner, v.channels) == (6, 3, 16, 1, 6)
    assert v.strides == ((288, 16, 48, 1, 0),)
    cl = x.contiguous(memory_format=torch.channels_last_3d)  # (N, T) merge in channels-last memory
    v = _triton._view(plan, x.shape, [cl.stride()])
    assert v is not None and (v.kept, v.kept_inner) == (6, 1) and v.strides == ((96, 0, 1, 6, 0),)
    v = _triton._view(plan, x.shape, [cl.stride(), x.stride()])  # both: as the contiguous one
    assert v is not None and (v.kept, v.kept_inner) == (6, 3)
    hcw = torch.zeros(2, 4, 8, 5).permute(0, 2, 1, 3)  # reduced (H, W) in two runs
    v = _triton._view(_plan(hcw, groups=4, channels_axis=1, reduction_axes=(2, 3)), hcw.shape, [hcw.stride()])
    assert v is not None and (v.reduced, v.reduced_inner) == (20, 5) and not v.wide


@pytest.mark.parametrize(
    "shape", [(1, 128, 64, 64), (2, 320, 64, 64), (1, 128, 512, 512), (1, 128, 20, 256, 256)], ids=str
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_split_geometry_at_batch_one_fills_a_gpu(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], channels_last: bool
) -> None:
    """With a GPU's worth of programs asked for (8 per multiprocessor of a 132-multiprocessor device),
    the benchmark's shapes get at least that many programs (or one per smallest tile), in chunks of whole
    tiles."""
    monkeypatch.setattr(_triton, "TARGET_PROGRAMS", 8 * 132)
    strides = _triton._contiguous_strides(shape)
    if channels_last:  # channels innermost
        order = [0, *range(2, len(shape)), 1]
        step, cl = 1, [0] * len(shape)
        for a in reversed(order):
            cl[a] = step
            step *= shape[a]
        strides = tuple(cl)
    plan = make_plan(shape, "float16", groups=32, channels_axis=1, reduction_axes=tuple(range(2, len(shape))))
    v = _triton._view(plan, shape, [strides, strides])
    assert v is not None and _triton._fused_tile(v) is None
    sp = _triton._split(v, torch.zeros(1))  # the tensor only names the device
    assert _triton.MIN_TILE_ELEMENTS <= sp.block_r * sp.block_c <= _triton.TILE_ELEMENTS
    assert sp.chunks * sp.chunk_rows >= v.reduced > (sp.chunks - 1) * sp.chunk_rows
    assert sp.chunk_rows % sp.block_r == 0
    programs = v.kept * sp.chunks * -(-v.channels // sp.block_c)
    assert programs >= min(8 * 132, math.prod(shape) // _triton.MIN_TILE_ELEMENTS) * 0.9
    assert sp.chunks * v.group_channels <= _triton.MAX_GROUP_PARTIALS
    if shape[0] == 1:
        assert sp.chunks > 1  # each group over several programs


def test_importable_without_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from groupnorm._plan import make_plan\n"
        "from groupnorm.backends.torch import _triton as t\n"
        "x = torch.zeros(2, 4, 3, 3)\n"
        "plan = make_plan(x.shape, 'float32', groups=2, channels_axis=1, reduction_axes=(2, 3))\n"
        "assert not t.HAVE_TRITON and not t.available(x)\n"
        "try:\n"
        "    t.forward(plan, x, None, None, None)\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    result = run_python("-c", code, TRITON_INTERPRET="1", GROUPNORM_TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr
    assert "refused: groupnorm's GPU kernels need Triton" in result.stdout


# ---------------------------------------------------------------------------------------------- on a GPU


@needs_cuda
@pytest.mark.parametrize("name", [n for n in CASES if CASES[n].path == "fused" or "float32" in n])
def test_gpu_case_matches_float64(name: str) -> None:
    from triton_check import run_case

    check_result(run_case(CASES[name], "cuda"))


GPU_SHAPES = [
    ("nchw", (1, 64, 48, 40), 1, (2, 3), "contiguous"),
    ("channels_last", (1, 64, 48, 40), 1, (2, 3), "channels_last"),
    ("per-frame", (1, 64, 3, 24, 20), 1, (3, 4), "contiguous"),
    ("per-clip-channels-last", (2, 64, 3, 24, 20), 1, (2, 3, 4), "channels_last"),
]


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("spec", GPU_SHAPES, ids=[s[0] for s in GPU_SHAPES])
def test_gpu_default_split_path_matches_float64(spec: tuple[Any, ...], dtype: str) -> None:
    from triton_cases import Case
    from triton_check import run_case

    layout, shape, axis, reduced, memory = spec
    case = Case(layout, shape, 32, axis, reduced, memory, dtype, "default", "silu")
    result = run_case(case, "cuda", settings={})
    assert "split" in result and result["split"]["chunks"] > 1
    check_result(result)


@needs_cuda
def test_gpu_passes_capture_in_a_cuda_graph_without_host_syncs() -> None:
    x = torch.randn(1, 64, 32, 32, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    x = x + 100
    w = torch.rand(64, device="cuda", dtype=torch.float16) + 0.5
    b = torch.randn(64, device="cuda", dtype=torch.float16)
    dy = torch.randn_like(x)
    plan = _plan(x, groups=32, channels_axis=1, reduction_axes=(2, 3))

    def step() -> tuple[torch.Tensor, ...]:
        y, shift, mean, rstd = _triton.forward(plan, x, w, b, "silu")
        grads = _triton.backward(plan, x, w, b, "silu", shift, mean, rstd, dy, (True, True, True))
        return (y, *(g for g in grads if g is not None))

    eager = step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x.add_(0)  # the same input, replayed
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
