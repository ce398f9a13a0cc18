"""The GPU benchmark's parts that need no GPU: what it measures, its ratios, means and table."""

from __future__ import annotations

import math

import pytest
import torch

from groupnorm.bench import fw_torch_cuda as bench


def test_configurations_are_every_shape_dtype_and_layout() -> None:
    configs = bench.configs()
    assert len(configs) == 5 * 2 * 2
    assert {c.shape for c in configs} == {
        (2, 320, 64, 64),
        (2, 1280, 8, 8),
        (1, 512, 128, 128),
        (1, 128, 512, 512),
        (1, 128, 20, 256, 256),
    }
    assert {c.dtype for c in configs} == {"float16", "bfloat16"}
    assert {c.layout for c in configs} == {"contiguous", "channels_last"}
    assert len(set(configs)) == len(configs)
    assert configs[0].label == "2x320x64x64 float16 contiguous"
    assert configs[0].bytes_moved == 2 * 2 * 2 * 320 * 64 * 64


def test_ratios_are_groupnorm_over_each_peer() -> None:
    times = {"groupnorm": 30.0, "eager": 120.0, "compiled": 40.0}
    assert bench.ratios(times) == pytest.approx({"eager": 30.0 / 120.0, "compiled": 30.0 / 40.0})
    assert bench.ratios({"eager": 1.0}) == {}


def test_geometric_mean() -> None:
    values = [0.25, 0.5, 2.0, 0.8]
    assert bench.geomean(values) == pytest.approx(math.prod(values) ** (1 / len(values)))
    assert math.isnan(bench.geomean([]))
    with pytest.raises(ValueError, match="positive"):
        bench.geomean([1.0, 0.0])


def test_summary_and_table() -> None:
    a, b = bench.configs()[:2]
    results = [
        bench.Result(a, {"groupnorm": 10.0, "eager": 40.0, "compiled": 20.0}, 0.0),
        bench.Result(b, {"groupnorm": 10.0, "eager": 10.0}, 0.001),
    ]
    means = bench.summary(results)
    assert means["eager"] == pytest.approx(math.sqrt(0.25 * 1.0))
    assert means["compiled"] == pytest.approx(0.5)  # measured on one configuration only
    text = bench.table(results)
    lines = text.splitlines()
    assert a.label in lines[2] and b.label in lines[3]
    assert "0.25" in lines[2] and "0.50" in lines[2]
    assert lines[3].split()[-2] == "-"  # no compiled time, no ratio
    assert f"groupnorm / eager: {means['eager']:.3f} over 2 configurations" in text
    assert f"groupnorm / compiled: {means['compiled']:.3f} over 1 configuration" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_run_refuses_without_a_cuda_device(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        bench.run(bench.configs()[:1])
    assert bench.main(["--rounds", "1"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
