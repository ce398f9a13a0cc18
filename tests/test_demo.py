"""The demo: argument parsing, the data it accepts or rejects, and a --quick run end to end."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from groupnorm import demo
from groupnorm.cli import main
from groupnorm.demo import data, report


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(argv)


def test_parse_defaults_and_flags() -> None:
    args = parse()
    assert (args.out, args.data, args.quick, args.epochs, args.samples, args.seed, args.seeds, args.threads) == (
        Path("."),
        None,
        False,
        None,
        None,
        0,
        demo.SEEDS,
        1,
    )
    assert 1 <= args.workers <= 2
    args = parse(
        "--quick", "--out", "o", "--data", "d.npz", "--epochs", "3", "--samples", "500", "--seed", "7", "--seeds", "2",
        "--workers", "1", "--threads", "2",
    )  # fmt: skip
    assert (args.out, args.data, args.quick, args.epochs, args.samples, args.seed, args.seeds, args.workers) == (
        Path("o"),
        Path("d.npz"),
        True,
        3,
        500,
        7,
        2,
        1,
    )
    assert args.threads == 2
    with pytest.raises(SystemExit):
        parse("--epochs", "two")


@pytest.mark.parametrize("flag", ["--epochs", "--seeds", "--workers", "--threads"])
def test_counts_below_one_are_refused(flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", flag, "0", "--out", str(tmp_path / "out")]) == 2  # refused before any data or training
    assert "must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_synthetic_data_is_deterministic_and_standardized() -> None:
    a, b, c = data.synthetic(400, seed=1), data.synthetic(400, seed=1), data.synthetic(400, seed=2)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    np.testing.assert_array_equal(a.val_y, b.val_y)
    assert not np.array_equal(a.train_x, c.train_x)
    assert a.train_x.shape == (300, 1, 16, 16)
    assert a.val_x.shape == (100, 1, 16, 16)
    assert a.train_x.dtype == np.float32
    assert a.classes == len(data.SHAPES)
    assert set(np.unique(a.train_y)) == set(range(len(data.SHAPES)))
    assert abs(float(a.train_x.mean())) < 1e-3
    assert abs(float(a.train_x.std()) - 1) < 1e-3


def test_synthetic_images_share_one_brightness_and_contrast() -> None:
    # Without pixel noise, every pixel is background (0) or shape (1), plus stripes of strength <= 0.3.
    # A per-image offset or gain, which per-image normalizations remove and BatchNorm does not, would move
    # an image's two levels away from 0 and 1.
    images, labels = data.synthetic_images(400, noise=0.0, seed=1)
    pixels = images.reshape(len(images), -1)
    background, shape = np.abs(pixels) <= 0.3 + 1e-6, np.abs(pixels - 1) <= 0.3 + 1e-6
    assert (background | shape).all()
    assert background.any(axis=1).all() and shape.any(axis=1).all()  # each image shows both levels
    assert pixels.min() < -0.25 and pixels.max() > 1.25  # the stripes are there, up to their full strength
    assert set(np.unique(labels)) == set(range(len(data.SHAPES)))


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW", "NHW1"])
def test_load_npz_layouts(tmp_path: Path, layout: str) -> None:
    channels = 3 if layout in ("NHWC", "NCHW") else 1
    # pixel value = 10 * row + 60 * channel: rows and channels can be told apart after loading
    image = 10 * np.arange(9)[None, :, None] + 60 * np.arange(channels)[:, None, None] + np.zeros((1, 1, 11))
    file_image = {"NHW": image[0], "NHWC": image.transpose(1, 2, 0), "NCHW": image, "NHW1": image.transpose(1, 2, 0)}
    images = np.stack([file_image[layout]] * 70).astype(np.uint8)
    path = tmp_path / "mine.npz"
    np.savez(path, images=images, labels=np.array([3, 7] * 35))
    ds = data.load_npz(path)
    assert ds.train_x.shape == (52, channels, 9, 11)
    assert ds.val_x.shape == (18, channels, 9, 11)
    assert ds.classes == 2
    assert set(np.unique(np.concatenate([ds.train_y, ds.val_y]))) == {0, 1}
    x = ds.train_x[0]
    np.testing.assert_allclose(x, (image - image.mean()) / image.std(), rtol=1e-5, atol=1e-5)


GOOD = {"images": np.zeros((70, 12, 12), np.float32), "labels": np.arange(70) % 3}
MALFORMED = {
    "missing labels": ({"images": GOOD["images"]}, "missing array"),
    "missing images": ({"labels": GOOD["labels"]}, "missing array"),
    "images of rank 2": ({**GOOD, "images": np.zeros((70, 144))}, "must be"),
    "images of rank 5": ({**GOOD, "images": np.zeros((70, 1, 12, 12, 1))}, "must be"),
    "no channel axis": ({**GOOD, "images": np.zeros((70, 12, 12, 12))}, "channel axis"),
    "tiny images": ({**GOOD, "images": np.zeros((70, 4, 4))}, "at least 8x8"),
    "string images": ({**GOOD, "images": np.full((70, 12, 12), "a")}, "real numbers"),
    "NaN in images": ({**GOOD, "images": np.full((70, 12, 12), np.nan)}, "NaN"),
    "2-D labels": ({**GOOD, "labels": np.zeros((70, 1), int)}, "1-D"),
    "float labels": ({**GOOD, "labels": np.arange(70) % 3 + 0.5}, "integers"),
    "lengths differ": ({**GOOD, "labels": np.arange(69) % 3}, "70 images but 69 labels"),
    "too few samples": ({"images": np.zeros((10, 12, 12)), "labels": np.arange(10) % 2}, "at least 64"),
    "one class": ({**GOOD, "labels": np.zeros(70, int)}, "two classes"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_load_npz_rejects_malformed_files(tmp_path: Path, case: str) -> None:
    arrays, message = MALFORMED[case]
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message):
        data.load_npz(path)


def test_load_npz_rejects_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        data.load_npz(tmp_path / "absent.npz")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match=r"not a readable \.npz|cannot read"):
        data.load_npz(tmp_path / "text.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(ValueError, match=r"single \.npy"):
        data.load_npz(tmp_path / "single.npy")
    np.savez(tmp_path / "objects.npz", images=np.array([None] * 70, dtype=object), labels=GOOD["labels"])
    with pytest.raises(ValueError, match="cannot read"):
        data.load_npz(tmp_path / "objects.npz")


def test_cli_reports_bad_data_without_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, images=GOOD["images"])
    assert main(["demo", "--data", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "missing array" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["demo", "--samples", "10"]) == 2
    assert "--samples" in capsys.readouterr().err


def check_outputs(out: Path, stdout: str, seeds: int) -> dict[str, Any]:
    results = json.loads((out / "groupnorm-demo.json").read_text())
    val = results["val_samples"]

    def check_cell(values: list[float]) -> None:
        assert len(values) == seeds
        assert all(0 <= e <= 1 for e in values)
        assert all(abs(e * val - round(e * val)) < 1e-4 for e in values)  # a fraction of the held-out images

    assert results["batch_sizes"] == [32, 16, 8, 4, 2]
    assert results["seeds"] == list(range(seeds))
    assert list(results["val_error"]) == ["BN", "LN", "IN", "GN"]
    for kind, cells in results["val_error"].items():
        # BatchNorm and GroupNorm at every batch size, LayerNorm and InstanceNorm at 32 (as in the paper)
        expected = ["32", "16", "8", "4", "2"] if kind in ("BN", "GN") else ["32"]
        assert list(cells) == expected
        for values in cells.values():
            check_cell(values)
    extra = results["extra"]
    assert list(extra["val_error"]) == list(extra["layers"]) == ["groupnorm", "torch"]
    for layer in extra["layers"]:
        assert list(extra["val_error"][layer]) == list(extra["inputs"])
        for values in extra["val_error"][layer].values():
            check_cell(values)
        assert all(len(v) == seeds and all(e >= 0 for e in v) for v in extra["norm_error"][layer].values())
    # the extra table's groupnorm, NCHW cell is the main table's GroupNorm at batch 32, trained once
    assert extra["val_error"]["groupnorm"]["contiguous"] == results["val_error"]["GN"]["32"]
    # groupnorm's first GroupNorm is exact to float32 rounding on every input, offset included
    assert max(max(v) for v in extra["norm_error"]["groupnorm"].values()) < 1e-4
    png = (out / "groupnorm-demo.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 10_000
    for name in ("BatchNorm", "LayerNorm", "InstanceNorm", "GroupNorm", "torch.nn.GroupNorm"):
        assert name in stdout
    bn_32 = results["val_error"]["BN"]["32"]
    mean, spread = statistics.fmean(bn_32), statistics.stdev(bn_32) if seeds > 1 else 0.0
    assert f"{100 * mean:.1f} ± {100 * spread:.1f}" in stdout
    return results


def test_quick_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0  # as a user runs it: 3 seeds, 2 workers
    results = check_outputs(tmp_path, capsys.readouterr().out, demo.SEEDS)
    assert results["epochs"] == demo.QUICK[1]
    assert results["train_samples"] + results["val_samples"] == demo.QUICK[0]
    # on the synthetic shapes, every network learns something in the quick run
    chance = 1 - 1 / len(data.SHAPES)
    assert max(max(v) for cells in results["val_error"].values() for v in cells.values()) < chance


def test_results_do_not_depend_on_the_number_of_workers(tmp_path: Path) -> None:
    # every training is seeded on its own, so running them on 2 processes or in this one gives the same errors
    errors = []
    for workers in (1, 2):
        argv = ["demo", "--samples", "300", "--epochs", "1", "--seeds", "1", "--workers", str(workers)]
        assert main([*argv, "--out", str(tmp_path / str(workers))]) == 0
        results = json.loads((tmp_path / str(workers) / "groupnorm-demo.json").read_text())
        errors.append((results["val_error"], results["extra"]["val_error"]))
    assert errors[0] == errors[1]


def test_report_cells_are_mean_and_sample_spread() -> None:
    values = [0.04, 0.05, 0.09]
    assert report.cell(values) == f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"
    assert report.cell([0.125]) == "12.5 ± 0.0"
    assert report.cell(None) == report.cell([]) == "-"


def test_own_data_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(80) % 2
    images = rng.normal(size=(80, 10, 10, 3)) + labels[:, None, None, None]  # NHWC, class shifts the level
    np.savez(tmp_path / "mine.npz", images=images, labels=labels)
    argv = ["demo", "--data", str(tmp_path / "mine.npz"), "--epochs", "1", "--seeds", "2", "--workers", "1"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    results = check_outputs(tmp_path, capsys.readouterr().out, 2)
    assert results["train_samples"] == 60
    assert "mine.npz" in str(results["data"])
