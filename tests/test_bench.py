"""The ``groupnorm bench`` command: parsing, its reference and peers, a tiny run end to end, the JSON schema."""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import groupnorm.numpy
from groupnorm.bench import _report, _runner, _sweep, add_arguments, fw_numpy
from groupnorm.bench._command import command_line, spec_from
from groupnorm.bench._core import FRAMEWORKS, SWEEPS, Candidate, Spec, Sweep, make_data, reference
from groupnorm.cli import main
from support import reference_group_norm

TINY = ["--shape", "2,8,4,4", "--groups", "4", "--repeats", "2", "--warmup", "1", "--min-time", "0", "--quiet"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_are_a_small_run_of_everything() -> None:
    args = parse()
    spec = spec_from(args)
    assert args.framework == list(FRAMEWORKS)
    assert args.mode == "both"
    assert not args.accuracy
    assert spec == Spec((8, 32, 32, 64), "NHWC", "float32", 32, 1e-5, None)
    assert spec.channels_axis == 3
    assert spec.reduction_axes == (1, 2)


@pytest.mark.parametrize(
    ("argv", "framework", "layout", "channels_axis", "reduction_axes"),
    [
        (["--framework", "torch", "--shape", "16,256,64,64", "--layout", "NCHW"], ["torch"], "NCHW", 1, (2, 3)),
        (["-f", "keras,tf1", "--shape", "16,64,64,256", "--layout", "NHWC"], ["keras", "tf1"], "NHWC", 3, (1, 2)),
        (
            ["-f", "all", "--shape", "2,8,5,4,4", "--layout", "NCHW", "--groups", "4"],
            list(FRAMEWORKS),
            "NCHW",
            1,
            (2, 3, 4),
        ),
    ],
)
def test_measurement_commands_parse(
    argv: list[str], framework: list[str], layout: str, channels_axis: int, reduction_axes: tuple[int, ...]
) -> None:
    args = parse(*argv, "--activation", "silu", "--mode", "forward", "--threads", "1")
    spec = spec_from(args)
    assert args.threads == [1]
    words = command_line(args).split()
    assert words[:2] == ["groupnorm", "bench"]
    assert parse(*words[2:]) == args  # the recorded command measures the same thing
    assert args.framework == framework
    assert (spec.layout, spec.channels_axis, spec.reduction_axes) == (layout, channels_axis, reduction_axes)
    assert spec.activation == "silu"
    assert args.mode == "forward"


def test_recorded_command_keeps_the_settings_that_change_the_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GROUPNORM_HUGE_PAGES", "0")
    monkeypatch.setenv("GROUPNORM_UNRELATED", "1")
    words = command_line(parse("--framework", "torch")).split()
    assert words == ["GROUPNORM_HUGE_PAGES=0", "groupnorm", "bench", "--framework", "torch"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--shape", "8,x,4"],
        ["--shape", "8,16"],
        ["--shape", "8,0,4,4"],
        ["--framework", "caffe"],
        ["--layout", "CHWN"],
        ["--dtype", "int8"],
        ["--activation", "tanh"],
    ],
)
def test_bad_arguments_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2


def test_contract_errors_are_reported_before_running(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "-f", "numpy", "--shape", "2,4,4,6", "--groups", "4", "--quiet"]) == 2
    assert "6 channels is not commensurate with 4 groups" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("activation", [None, "silu", "gelu"])
def test_reference_agrees_with_the_test_suites_reference(layout: str, activation: str | None) -> None:
    spec = Spec((2, 6, 3, 4) if layout == "NCHW" else (2, 3, 4, 6), layout, "float64", 3, 1e-3, activation)
    x = make_data(spec, mean_over_std=3.0).x
    expected = reference_group_norm(x, 3, spec.channels_axis, spec.reduction_axes, None, None, 1e-3, activation)
    np.testing.assert_allclose(reference(spec, x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("activation", [None, "relu", "silu"])
def test_plain_numpy_peer_forward_and_backward(layout: str, activation: str | None) -> None:
    spec = Spec((2, 8, 3, 5) if layout == "NCHW" else (2, 3, 5, 8), layout, "float64", 4, 1e-5, activation)
    data = make_data(spec, mean_over_std=2.0, seed=1)
    rng = np.random.default_rng(2)
    gamma, beta = rng.normal(1, 0.5, spec.channels), rng.normal(0, 0.5, spec.channels)
    kwargs: dict[str, Any] = {
        "groups": 4,
        "channels_axis": spec.channels_axis,
        "reduction_axes": spec.reduction_axes,
        "gamma": gamma,
        "beta": beta,
        "epsilon": 1e-5,
        "activation_fn": activation,
    }
    y, xhat, rstd = fw_numpy.plain_forward(spec, data.x, gamma, beta)
    np.testing.assert_allclose(y, groupnorm.numpy.forward(data.x, **kwargs), atol=1e-10)
    got = fw_numpy.plain_backward(spec, data.x, xhat, rstd, gamma, beta, data.cotangent)
    want = groupnorm.numpy.vjp(data.x, data.cotangent, **kwargs)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-9)


def test_time_interleaved_rotates_and_survives_errors() -> None:
    calls: list[str] = []

    def fails() -> None:
        raise RuntimeError("boom")

    fns = [lambda: calls.append("a"), fails, lambda: calls.append("b")]
    timings = _runner.time_interleaved(fns, warmup=2, repeats=3, min_sample_s=0.0)
    assert [len(t.samples) for t in timings] == [3, 0, 3]
    assert timings[1].error == "RuntimeError: boom"
    assert calls == ["a", "a", "b", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rotating rounds
    assert all(s >= 0 for t in timings for s in t.samples)


def _run_json(tmp_path: Path, *argv: str) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    assert main(["bench", *argv, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert _report.validate(doc) == []
    return doc


def _assert_all_ok(rows: list[dict[str, Any]]) -> None:
    bad = [(r["candidate"], r["status"], r["detail"]) for r in rows if r["status"] != "ok"]
    assert not bad


@pytest.mark.extras
def test_numpy_and_torch_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "bench.png"
    doc = _run_json(
        tmp_path,
        "-f",
        "numpy,torch",
        *TINY,
        "--layout",
        "NCHW",
        "--activation",
        "silu",
        "--mean-over-std",
        "100",
        "--plot",
        str(png),
    )
    printed = capsys.readouterr().out
    (run,) = doc["runs"]
    assert run["command"] == (
        "groupnorm bench --framework numpy,torch --shape 2,8,4,4 --layout NCHW --groups 4 --activation silu "
        "--repeats 2 --warmup 1 --min-time 0.0 --mean-over-std 100.0"
    )
    assert run["config"]["shape"] == [2, 8, 4, 4]
    assert run["config"]["activation"] == "silu"
    _assert_all_ok(run["speed"])
    kinds = {(r["framework"], r["variant"], r["role"], r["mode"]) for r in run["speed"]}
    for mode in ("forward", "forward+backward"):
        assert ("numpy", "", "floor", mode) in kinds
        for variant in ("contiguous", "channels_last"):
            assert {("torch", variant, role, mode) for role in ("groupnorm", "peer")} <= kinds
    for r in run["speed"]:
        assert len(r["samples_s"]) == 2
        assert r["median_s"] == pytest.approx(float(np.median(r["samples_s"])))
        assert r["gb_per_s"] > 0
    assert {c["peer"] for c in run["comparisons"]} == {
        "plain NumPy (reshape, mean, var)",
        "torch.nn.GroupNorm + F.silu",
    }
    for c in run["comparisons"]:
        assert c["ratio"] == pytest.approx(c["groupnorm_median_s"] / c["peer_median_s"])
    assert "torch.nn.GroupNorm + F.silu" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.extras
def test_accuracy_end_to_end(tmp_path: Path) -> None:
    doc = _run_json(tmp_path, "--accuracy", "-f", "numpy,torch", *TINY)
    (run,) = doc["runs"]
    assert run["speed"] == []
    assert run["comparisons"] == []
    cases = {c.name for c in _runner.ACCURACY_CASES}
    assert {r["case"] for r in run["accuracy"]} == cases
    _assert_all_ok(run["accuracy"])
    for r in run["accuracy"]:
        assert r["nan_count"] is not None
        assert r["inf_count"] is not None
        if r["role"] == "groupnorm":
            assert r["nan_count"] == r["inf_count"] == 0
            assert r["max_abs_error"] <= (2e-3 if r["dtype"] == "float16" else 1e-5), r
    plain = {r["case"]: r for r in run["accuracy"] if r["candidate"].startswith("plain")}
    assert plain["float32, mean 0"]["max_abs_error"] < 1e-5
    assert plain["float32, mean 1e4 x spread"]["max_abs_error"] > plain["float32, mean 0"]["max_abs_error"]


@pytest.mark.extras
def test_keras_tf1_flax_end_to_end(tmp_path: Path) -> None:
    doc = _run_json(tmp_path, "-f", "keras,tf1,flax", *TINY, "--accuracy", "--speed", "--repeats", "1")
    (run,) = doc["runs"]
    _assert_all_ok(run["speed"])
    _assert_all_ok(run["accuracy"])
    assert {r["framework"] for r in run["speed"]} == {"keras", "tf1", "flax"}
    assert len(run["comparisons"]) == 6
    f32 = [r for r in run["accuracy"] if r["case"] == "float32, mean 0"]
    assert all(r["max_abs_error"] < 1e-5 for r in f32)


@pytest.mark.extras
def test_load_merges_saved_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = _run_json(tmp_path, "-f", "numpy", *TINY, "--mode", "forward")
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(first))
    png = tmp_path / "merged.png"
    out = tmp_path / "merged.json"
    argv = [
        "bench",
        "--load",
        str(tmp_path / "a.json"),
        str(tmp_path / "b.json"),
        "--json",
        str(out),
        "--plot",
        str(png),
    ]
    assert main(argv) == 0
    merged = json.loads(out.read_text())
    assert _report.validate(merged) == []
    assert merged["runs"] == first["runs"] * 2
    assert png.exists()
    md = tmp_path / "merged.md"
    assert main(["bench", "--load", str(out), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert text.count(f"`{first['runs'][0]['command']}`") == 2
    assert "| numpy |  | forward | groupnorm.group_norm | plain NumPy (reshape, mean, var) |" in text
    (tmp_path / "bad.json").write_text(json.dumps({"schema": "other"}))
    capsys.readouterr()
    assert main(["bench", "--load", str(tmp_path / "bad.json")]) == 2
    assert "not a groupnorm bench document" in capsys.readouterr().err


def _doc() -> dict[str, Any]:
    row = {
        "framework": "numpy",
        "candidate": "numpy.copy",
        "role": "floor",
        "variant": "",
        "layout": "NHWC",
        "mode": "forward",
        "status": "ok",
        "detail": "",
        "median_s": 1e-3,
        "samples_s": [1e-3],
        "calls_per_sample": 3,
        "gb_per_s": 1.5,
        "vs_floor": 1.0,
    }
    config = {
        "shape": [2, 4, 4, 8],
        "layout": "NHWC",
        "dtype": "float32",
        "groups": 4,
        "epsilon": 1e-5,
        "activation": None,
        "frameworks": ["numpy"],
        "modes": ["forward"],
        "repeats": 1,
        "warmup": 1,
        "min_sample_s": 0.0,
        "seed": 0,
        "mean_over_std": 0.0,
        "threads": None,
    }
    return {
        "schema": _report.SCHEMA_ID,
        "groupnorm_version": "0",
        "created": "now",
        "machine": _report.machine(),
        "runs": [{"command": "groupnorm bench", "config": config, "speed": [row], "comparisons": [], "accuracy": []}],
    }


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("schema",), "groupnorm-bench/0", "$.schema"),
        (("runs", 0, "speed", 0, "role"), "winner", "$.runs[0].speed[0].role"),
        (("runs", 0, "speed", 0, "median_s"), "fast", "expected number"),
        (("runs", 0, "speed", 0, "calls_per_sample"), True, "expected int"),
        (("runs", 0, "config", "shape"), [2, "4"], "$.runs[0].config.shape[1]"),
        (("runs", 0, "config", "extra"), 1, "unexpected 'extra'"),
        (("machine", "versions"), {"numpy": 2}, "$.machine.versions.numpy"),
    ],
)
def test_schema_validation_catches_mistakes(path: tuple[Any, ...], value: Any, message: str) -> None:
    assert _report.validate(_doc()) == []
    doc = copy.deepcopy(_doc())
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    errors = _report.validate(doc)
    assert any(message in e for e in errors), errors


def test_schema_validation_catches_missing_fields() -> None:
    doc = _doc()
    del doc["runs"][0]["speed"][0]["gb_per_s"]
    assert _report.validate(doc) == ["$.runs[0].speed[0]: missing 'gb_per_s'"]


def test_docs_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    blocks = [b.split("```", 1)[0] for b in page.read_text().split("```python\n")[1:]]
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(page), "exec"), {})


# ------------------------------------------------------------------------------------------------ --sweep


def _fake_run(
    shape: tuple[int, ...], medians: dict[tuple[str, str, str], float | None], **config: Any
) -> dict[str, Any]:
    """A torch run whose candidates took ``medians[(role, variant, mode)]`` seconds (None: failed), made
    with the runner's own row and comparison code."""
    spec = Spec(shape, "NCHW", "float32", 32)
    speed, comparisons = [], []
    names = {"groupnorm": "groupnorm.torch.GroupNorm", "peer": "torch.nn.GroupNorm", "floor": "copy"}
    for mode in ("forward", "forward+backward"):
        floor = medians[("floor", "", "forward")]
        rows = []
        for (role, variant, m), median in medians.items():
            if m != mode and not (role == "floor" and m == "forward"):
                continue
            c = Candidate(names[role], role, variant)  # type: ignore[arg-type]
            t = _runner.Timing(samples=[] if median is None else [median])
            if median is None:
                t.error = "RuntimeError: failed"
            rows.append(_runner._speed_row("torch", mode, c, t, spec, floor))
        speed += rows
        comparisons += _runner._compare("torch", mode, rows)
    cfg = {**spec.describe(), "frameworks": ["torch"], "threads": None, "sweep": "torch", "device": "cpu", **config}
    return {"command": "groupnorm bench --sweep", "config": cfg, "speed": speed, "comparisons": comparisons}


SMALL, LARGE = (2, 32, 8, 8), (1, 128, 16, 16)
F, FB = "forward", "forward+backward"
TIMES = {
    SMALL: {
        ("groupnorm", "contiguous", F): 2e-6, ("peer", "contiguous", F): 4e-6,
        ("groupnorm", "channels_last", F): 3e-6, ("peer", "channels_last", F): 3e-6,
        ("groupnorm", "contiguous", FB): 1e-5, ("peer", "contiguous", FB): 2e-5,
        ("groupnorm", "channels_last", FB): 1e-5, ("peer", "channels_last", FB): None,
        ("floor", "", F): 1e-6,
    },
    LARGE: {
        ("groupnorm", "contiguous", F): 9e-6, ("peer", "contiguous", F): 1e-6,
        ("groupnorm", "channels_last", F): 2e-6, ("peer", "channels_last", F): 8e-6,
        ("groupnorm", "contiguous", FB): 4e-5, ("peer", "contiguous", FB): 1e-5,
        ("groupnorm", "channels_last", FB): 3e-5, ("peer", "channels_last", FB): 1e-5,
        ("floor", "", F): 4e-6,
    },
}  # fmt: skip


def test_sweep_summary_from_fake_timings() -> None:
    runs = [_fake_run(shape, times) for shape, times in TIMES.items()]
    (summary,) = _sweep.summarize(runs)
    assert summary["framework"] == "torch" and summary["threads"] is None
    assert (summary["groupnorm"], summary["peer"]) == ("groupnorm.torch.GroupNorm", "torch.nn.GroupNorm")
    means = {(g["variant"], g["mode"]): (g["ratio"], g["shapes"]) for g in summary["geomeans"]}
    assert means[("contiguous", F)] == (pytest.approx(math.sqrt(0.5 * 9)), 2)
    assert means[("channels_last", F)] == (pytest.approx(math.sqrt(1.0 * 0.25)), 2)
    assert means[("all", F)] == (pytest.approx((0.5 * 9 * 1.0 * 0.25) ** 0.25), 4)
    assert means[("contiguous", FB)] == (pytest.approx(math.sqrt(0.5 * 4)), 2)
    assert means[("channels_last", FB)] == (pytest.approx(3.0), 1)  # the small shape's peer failed
    assert means[("all", FB)] == (pytest.approx((0.5 * 4 * 3) ** (1 / 3)), 3)
    assert summary["worst_forward_ratio"] == pytest.approx(9.0)
    assert (summary["worst_forward_shape"], summary["worst_forward_variant"]) == ([1, 128, 16, 16], "contiguous")
    assert summary["smallest_shape"] == [2, 32, 8, 8]
    small = {(r["variant"], r["mode"]): r for r in summary["smallest"]}
    assert len(small) == 4
    assert small[("contiguous", F)]["groupnorm_median_s"] == 2e-6
    assert small[("contiguous", F)]["ratio"] == pytest.approx(0.5)
    assert small[("channels_last", FB)]["ratio"] is None
    rows = {(tuple(r["shape"]), r["variant"], r["mode"]): r for r in summary["rows"]}
    assert len(rows) == 8
    assert rows[(SMALL, "contiguous", F)]["nbytes"] == 2 * 32 * 8 * 8 * 4
    # time against the copy floor: forward against one copy, forward+backward against 2.5 (five tensors moved)
    assert rows[(SMALL, "contiguous", F)]["groupnorm_vs_floor"] == pytest.approx(2.0)
    assert rows[(SMALL, "contiguous", F)]["peer_vs_floor"] == pytest.approx(4.0)
    assert rows[(SMALL, "contiguous", FB)]["groupnorm_vs_floor"] == pytest.approx(1e-5 / 2.5e-6)
    assert rows[(LARGE, "channels_last", F)]["groupnorm_vs_floor"] == pytest.approx(0.5)
    doc = {**_doc(), "runs": [{**r, "accuracy": []} for r in runs], "sweeps": [summary]}
    for run in doc["runs"]:
        run["config"] = {**_doc()["runs"][0]["config"], **{k: run["config"][k] for k in ("shape", "sweep", "device")}}
    assert _report.validate(doc) == []
    title, headers, table, lines = _report.sweep_table(summary)
    assert title.startswith("Sweep (torch): groupnorm.torch.GroupNorm / torch.nn.GroupNorm, threads: default")
    assert headers[:4] == ["shape", "MiB", "contiguous fwd", "contiguous fwd+bwd"]
    assert table[-1][:4] == ["geomean", "", "2.12", "1.41"]
    assert table[0][4] == "2.00 / 4.00"
    assert "worst forward ratio: 9.00 (1x128x16x16, contiguous)" in lines
    assert "smallest shape 2x32x8x8, contiguous forward: 2 us against 4 us per call (ratio 0.50)" in lines


def test_sweep_summaries_are_per_thread_count_and_leave_other_runs_out() -> None:
    runs = [_fake_run(SMALL, TIMES[SMALL], threads=t) for t in (1, 2)]
    plain = _fake_run(LARGE, TIMES[LARGE], sweep=None)
    summaries = _sweep.summarize([*runs, plain])
    assert [s["threads"] for s in summaries] == [1, 2]
    assert all(s["smallest_shape"] == [2, 32, 8, 8] and len(s["rows"]) == 4 for s in summaries)
    assert _sweep.summarize([plain]) == []
    assert _sweep.geomean([]) is None
    assert _sweep.geomean([2.0, 8.0]) == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("budget", "round_s", "repeats", "rounds"),
    [(None, 5.0, 7, 7), (1.0, 0.3, 7, 3), (10.0, 0.1, 7, 7), (2.0, 0.4, 9, 5), (0.1, 1.0, 7, 3), (0.1, 1.0, 2, 2)],
)
def test_rounds_fit_the_budget(budget: float | None, round_s: float, repeats: int, rounds: int) -> None:
    assert _runner.rounds_within(budget, round_s, repeats) == rounds


@pytest.mark.extras
def test_sweep_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(SWEEPS, "torch", Sweep("NCHW", ((2, 32, 4, 4), (1, 64, 2, 3))))
    argv = ["--sweep", "-f", "torch", "--threads", "1,2", "--repeats", "2", "--warmup", "1", "--min-time", "0"]
    doc = _run_json(tmp_path, *argv, "--quiet", "--markdown", str(tmp_path / "sweep.md"))
    printed = capsys.readouterr().out
    assert len(doc["runs"]) == 4
    assert [(r["config"]["shape"], r["config"]["threads"]) for r in doc["runs"]] == [
        ([2, 32, 4, 4], 1), ([2, 32, 4, 4], 2), ([1, 64, 2, 3], 1), ([1, 64, 2, 3], 2)
    ]  # fmt: skip
    assert doc["runs"][0]["command"] == (
        "groupnorm bench --framework torch --repeats 2 --warmup 1 --min-time 0.0 --threads 1,2 --sweep"
    )
    for run in doc["runs"]:
        _assert_all_ok(run["speed"])
        assert run["config"]["sweep"] == "torch" and run["config"]["layout"] == "NCHW"
        assert not any("NHWC view" in r["candidate"] for r in run["speed"])  # the sweep times the layer itself
        assert {r["candidate"] for r in run["speed"] if r["role"] == "floor"} == {
            "torch.Tensor.copy_ (into a written buffer)"
        }
    assert [s["threads"] for s in doc["sweeps"]] == [1, 2]
    for summary in doc["sweeps"]:
        assert len(summary["rows"]) == 8 and summary["smallest_shape"] == [1, 64, 2, 3]
        assert all(r["ratio"] > 0 and r["groupnorm_vs_floor"] > 0 for r in summary["rows"])
        assert len(summary["geomeans"]) == 6
    assert "Sweep (torch)" in printed and "geomean" in printed and "worst forward ratio" in printed
    assert "| geomean |" in (tmp_path / "sweep.md").read_text()
    merged = tmp_path / "merged.json"
    assert main(["bench", "--load", str(tmp_path / "bench.json"), "--json", str(merged)]) == 0
    assert json.loads(merged.read_text())["sweeps"] == doc["sweeps"]


def test_the_flax_sweep_is_the_torch_sweep_in_flax_layout() -> None:
    torch_sweep, flax_sweep = SWEEPS["torch"], SWEEPS["flax"]
    assert (torch_sweep.layout, flax_sweep.layout) == ("NCHW", "NHWC")
    assert [(n, c, h, w) for n, h, w, c in flax_sweep.shapes] == list(torch_sweep.shapes)


@pytest.mark.extras
def test_flax_sweep_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SWEEPS, "flax", Sweep("NHWC", ((2, 4, 4, 32), (1, 2, 3, 64))))
    doc = _run_json(tmp_path, "--sweep", "-f", "flax", "--repeats", "2", "--warmup", "1", "--min-time", "0", "--quiet")
    assert [r["config"]["shape"] for r in doc["runs"]] == [[2, 4, 4, 32], [1, 2, 3, 64]]
    for run in doc["runs"]:
        _assert_all_ok(run["speed"])
        assert run["config"]["sweep"] == "flax" and run["config"]["layout"] == "NHWC"
    (summary,) = doc["sweeps"]
    assert summary["peer"] == "flax.nnx.GroupNorm" and len(summary["rows"]) == 4
    assert all(r["ratio"] > 0 and r["groupnorm_vs_floor"] > 0 for r in summary["rows"])
    assert len(summary["geomeans"]) == 2 and summary["smallest_shape"] == [1, 2, 3, 64]


@pytest.mark.extras
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sweep", "-f", "keras"], "--sweep has shapes for torch, flax only, not for keras"),
        (["--sweep", "-f", "torch", "--accuracy"], "--sweep measures speed"),
        (["-f", "keras", "--threads", "1,2"], "keras take theirs at start-up"),
    ],
)
def test_sweep_and_thread_errors_are_reported_before_running(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", *argv, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_bad_thread_counts_are_usage_errors() -> None:
    for text in ("0", "1,x", ""):
        with pytest.raises(SystemExit):
            parse("--threads", text)


def test_a_device_without_a_benchmark_module_is_reported_missing(tmp_path: Path) -> None:
    doc = _run_json(tmp_path, "-f", "numpy", *TINY, "--device", "cuda", "--mode", "forward")
    (run,) = doc["runs"]
    assert run["config"]["device"] == "cuda"
    (row,) = run["speed"]
    assert row["status"] == "missing" and "no cuda benchmark for numpy" in row["detail"]


def test_documents_written_before_the_sweep_still_load() -> None:
    saved = Path(__file__).resolve().parents[1] / "docs" / "bench" / "torch.json"
    doc = json.loads(saved.read_text())
    assert "sweeps" not in doc and "sweep" not in doc["runs"][0]["config"]
    assert _report.validate(doc) == []
