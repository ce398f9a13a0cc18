"""The demo: argument parsing, the data it accepts or rejects, and a --quick run end to end."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from groupnorm import demo
from groupnorm.cli import main
from groupnorm.demo import data


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(argv)


def test_parse_defaults_and_flags() -> None:
    args = parse()
    assert (args.out, args.data, args.quick, args.epochs, args.samples, args.seed) == (
        Path("."),
        None,
        False,
        None,
        None,
        0,
    )
    assert args.threads >= 1
    args = parse("--quick", "--out", "o", "--data", "d.npz", "--epochs", "3", "--samples", "500", "--seed", "7")
    assert (args.out, args.data, args.quick, args.epochs, args.samples, args.seed) == (
        Path("o"),
        Path("d.npz"),
        True,
        3,
        500,
        7,
    )
    with pytest.raises(SystemExit):
        parse("--epochs", "two")


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
    # brightness and contrast vary per image: the per-image means and spreads differ widely
    spreads = a.train_x.std(axis=(1, 2, 3))
    assert spreads.max() / spreads.min() > 2


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


def check_outputs(out: Path, stdout: str) -> dict[str, object]:
    results = json.loads((out / "groupnorm-demo.json").read_text())
    assert results["batch_sizes"] == [32, 16, 8, 4, 2]
    assert list(results["val_error"]) == ["BN", "LN", "IN", "GN"]
    for kind in results["val_error"]:
        assert sorted(results["val_error"][kind], key=int, reverse=True) == ["32", "16", "8", "4", "2"]
        assert all(0 <= e <= 1 for e in results["val_error"][kind].values())
        # the error is a fraction of the held-out images
        assert all(
            abs(e * results["val_samples"] - round(e * results["val_samples"])) < 1e-6
            for e in results["val_error"][kind].values()
        )
    png = (out / "groupnorm-demo.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 10_000
    for name in ("BatchNorm", "LayerNorm", "InstanceNorm", "GroupNorm"):
        assert name in stdout
    bn_32 = results["val_error"]["BN"]["32"]  # type: ignore[index]
    assert f"{100 * bn_32:.1f}" in stdout
    return results


def test_quick_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    results = check_outputs(tmp_path, capsys.readouterr().out)
    assert results["epochs"] == demo.QUICK[1]
    assert results["train_samples"] + results["val_samples"] == demo.QUICK[0]  # type: ignore[operator]
    # on the synthetic shapes, every network learns something in the quick run
    chance = 1 - 1 / len(data.SHAPES)
    assert min(min(v.values()) for v in results["val_error"].values()) < chance  # type: ignore[attr-defined]


def test_own_data_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(80) % 2
    images = rng.normal(size=(80, 10, 10, 3)) + labels[:, None, None, None]  # NHWC, class shifts the level
    np.savez(tmp_path / "mine.npz", images=images, labels=labels)
    assert main(["demo", "--data", str(tmp_path / "mine.npz"), "--epochs", "1", "--out", str(tmp_path)]) == 0
    results = check_outputs(tmp_path, capsys.readouterr().out)
    assert results["train_samples"] == 60
    assert "mine.npz" in str(results["data"])
