"""The demo's data: a synthetic image set generated on the spot, or the user's own ``.npz`` file.

Every array returned here is ``float32`` of shape ``(N, C, H, W)`` (images) and ``int64`` of shape ``(N,)``
(labels ``0 .. K-1``); NumPy only, no framework.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The synthetic set's classes: a shape drawn at a random place, size and angle.
SHAPES = ("disk", "ring", "square", "frame", "plus", "cross", "triangle", "bars")

#: Fewest samples ``--data`` may hold, and the smallest image side.
MIN_SAMPLES = 64
MIN_SIDE = 8


@dataclass(frozen=True)
class Dataset:
    """Images ``(N, C, H, W)`` float32 standardized with the training split's mean and spread; labels ``(N,)``."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    classes: int
    description: str


def synthetic_images(n: int, *, size: int = 16, noise: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` grayscale ``size x size`` images of the eight :data:`SHAPES`, deterministic for a given seed.

    The class is the shape alone. Everything else is a nuisance that varies per image: position, size and
    rotation of the shape, a striped background of random angle, frequency and strength, and pixel noise.
    Every image has the same brightness and contrast: a per-image offset or gain would be removed by the
    per-image normalizations (GroupNorm, LayerNorm, InstanceNorm) and not by BatchNorm, which would favour
    one side of the comparison by construction.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPES), size=n)

    def per_image(low: float, high: float) -> np.ndarray:
        return rng.uniform(low, high, size=(n, 1, 1))

    grid = (np.arange(size) - (size - 1) / 2) / (size / 2)  # pixel centres in [-1, 1]
    gy, gx = np.meshgrid(grid, grid, indexing="ij")
    angle = per_image(-0.4, 0.4)
    radius = per_image(0.45, 0.75)
    dx, dy = gx - per_image(-0.3, 0.3), gy - per_image(-0.3, 0.3)
    u = (np.cos(angle) * dx + np.sin(angle) * dy) / radius  # shape coordinates: the shape spans [-1, 1]
    v = (np.cos(angle) * dy - np.sin(angle) * dx) / radius
    r, box, bar = np.hypot(u, v), np.maximum(abs(u), abs(v)), 0.3
    d1, d2 = abs(u + v) / np.sqrt(2), abs(u - v) / np.sqrt(2)
    masks = {
        "disk": r < 1,
        "ring": abs(r - 0.8) < 0.25,
        "square": box < 0.85,
        "frame": abs(box - 0.75) < 0.22,
        "plus": (box < 1) & ((abs(u) < bar) | (abs(v) < bar)),
        "cross": (r < 1.1) & ((d1 < bar) | (d2 < bar)),
        "triangle": (v < 0.7) & (v > 2 * abs(u) - 1.1),
        "bars": (abs(v) < 1) & (abs(abs(u) - 0.55) < 0.22),
    }
    shape = np.zeros((n, size, size))
    for k, name in enumerate(SHAPES):
        shape[labels == k] = masks[name][labels == k]

    theta, freq, phase = per_image(0, np.pi), per_image(1.5, 4.5), per_image(0, 2 * np.pi)
    stripes = np.sin(freq * np.pi * (np.cos(theta) * gx + np.sin(theta) * gy) + phase)
    images = shape + per_image(0.0, 0.3) * stripes + noise * rng.standard_normal((n, size, size))
    return images[:, None].astype(np.float32), labels.astype(np.int64)


def split(images: np.ndarray, labels: np.ndarray, *, val_fraction: float, seed: int, description: str) -> Dataset:
    """Shuffle deterministically, hold out ``val_fraction`` for validation, standardize with training statistics.

    Standardizing uses one mean and one spread for the whole training split (never per image), so whatever
    varies from image to image stays in the data for the normalization layers to deal with.
    """
    order = np.random.default_rng(seed).permutation(len(labels))
    n_val = max(1, round(len(labels) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    mean, std = float(images[train].mean()), float(images[train].std())
    scale = 1.0 / std if std > 0 else 1.0
    x = ((images - mean) * scale).astype(np.float32)
    return Dataset(x[train], labels[train], x[val], labels[val], int(labels.max()) + 1, description)


def synthetic(n: int, *, noise: float = 0.3, seed: int = 0) -> Dataset:
    """The default data set: ``n`` synthetic images (see :func:`synthetic_images`), a quarter held out."""
    images, labels = synthetic_images(n, noise=noise, seed=seed)
    description = f"synthetic shapes: {n} grayscale 16x16 images, {len(SHAPES)} classes (seed {seed})"
    return split(images, labels, val_fraction=0.25, seed=seed, description=description)


def load_npz(path: str | Path, *, seed: int = 0) -> Dataset:
    """The user's data set from an ``.npz`` file with arrays ``images`` and ``labels``; a quarter held out.

    ``images``: real numbers, finite, of shape ``(N, H, W)`` (grayscale) or 4-D with the channel axis
    either last, ``(N, H, W, C)``, or second, ``(N, C, H, W)``: the last axis is the channel axis when it
    has at most 4 entries, otherwise the second axis is, when it has at most 4; H and W must be at least
    8. ``labels``: integers of shape ``(N,)``; their distinct values (at least two) become the classes.
    N must be at least 64. Raises ``ValueError`` saying what is wrong with the file.
    """
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file.") from None
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"{path}: not a readable .npz file ({error}).") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: expected an .npz archive (numpy.savez), got a single .npy array.")
    with archive:
        missing = [key for key in ("images", "labels") if key not in archive.files]
        if missing:
            raise ValueError(f"{path}: missing array(s) {missing}; the file has {sorted(archive.files)}.")
        try:
            images, labels = archive["images"], archive["labels"]
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise ValueError(f"{path}: cannot read the arrays ({error}).") from None

    if images.dtype.kind not in "uif":
        raise ValueError(f"{path}: images must hold real numbers, got dtype {images.dtype}.")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        if images.shape[-1] <= 4:
            images = images.transpose(0, 3, 1, 2)
        elif images.shape[1] > 4:
            raise ValueError(
                f"{path}: cannot find the channel axis of images of shape {images.shape}: "
                "expected (N, H, W, C) or (N, C, H, W) with C <= 4."
            )
    else:
        raise ValueError(f"{path}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W); got shape {images.shape}.")
    if min(images.shape[2:]) < MIN_SIDE:
        raise ValueError(f"{path}: images must be at least {MIN_SIDE}x{MIN_SIDE}; got {images.shape[2:]}.")
    if labels.ndim != 1:
        raise ValueError(f"{path}: labels must be 1-D (N,); got shape {labels.shape}.")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: labels must be integers, got dtype {labels.dtype}.")
    if len(labels) != len(images):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels.")
    if len(labels) < MIN_SAMPLES:
        raise ValueError(f"{path}: {len(labels)} samples; the demo needs at least {MIN_SAMPLES}.")
    images = images.astype(np.float32)
    if not np.isfinite(images).all():
        raise ValueError(f"{path}: images contain NaN or infinite values.")
    values, classes = np.unique(labels, return_inverse=True)
    if len(values) < 2:
        raise ValueError(f"{path}: labels must name at least two classes; all are {values[0]}.")
    n, c, h, w = images.shape
    description = f"{path.name}: {n} images {c}x{h}x{w}, {len(values)} classes"
    return split(images, classes.astype(np.int64), val_fraction=0.25, seed=seed, description=description)
