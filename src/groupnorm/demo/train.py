"""The network and its training: one small CNN, four normalization layers, five batch sizes.

This is where the demo uses the library: ``groupnorm.torch.GroupNorm`` is a drop-in for
``torch.nn.GroupNorm``, and LayerNorm and InstanceNorm are its two extreme cases (one group; one group
per channel). BatchNorm is PyTorch's own ``BatchNorm2d``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.progress import Progress, TaskID, TimeElapsedColumn
from torch import nn

from groupnorm.demo.data import Dataset
from groupnorm.torch import GroupNorm

#: The normalizations compared, in the paper's order, and the group count GroupNorm uses.
NORMS = ("BN", "LN", "IN", "GN")
NORM_NAMES = {"BN": "BatchNorm", "LN": "LayerNorm", "IN": "InstanceNorm", "GN": "GroupNorm"}
GROUPS = 8


def norm_layer(kind: str, channels: int) -> nn.Module:
    """The normalization layer ``kind`` for ``channels`` channels (NCHW input)."""
    if kind == "BN":
        return nn.BatchNorm2d(channels)  # per-batch statistics in training, running averages in evaluation
    groups = {"GN": GROUPS, "LN": 1, "IN": channels}[kind]
    layer: nn.Module = GroupNorm(groups, channels)  # the drop-in for torch.nn.GroupNorm
    return layer


class Net(nn.Module):
    """Three 3x3 conv -> norm -> ReLU stages (16, 32, 64 channels; the last two stride 2), then linear."""

    def __init__(self, kind: str, in_channels: int, classes: int, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(in_channels, width, 3, stride, 1, bias=False), norm_layer(kind, width), nn.ReLU()]
            in_channels = width
        # 16x16 images are 4x4 here already; other sizes are pooled to 4x4
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.classifier = nn.Linear(in_channels * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Schedule:
    """How each network trains: the same epochs for every batch size, the learning rate scaled linearly."""

    epochs: int
    base_lr: float = 0.1  # at batch 32; lr = base_lr * batch / 32 (Goyal et al.; the paper's rule)
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def lr(self, batch: int) -> float:
        return self.base_lr * batch / 32


def train_and_evaluate(
    kind: str,
    batch: int,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    classes: int,
    schedule: Schedule,
    *,
    seed: int,
    progress: Callable[[int], None] = lambda steps: None,
) -> float:
    """Train a fresh :class:`Net` with normalization ``kind`` at ``batch`` images per step; its validation error.

    Every run starts from the same weights (the convolutions and the classifier are drawn from ``seed``)
    and sees the training images in the same per-epoch orders. The learning rate warms up linearly to
    ``schedule.lr(batch)`` over the first epoch and decays to zero along a cosine. ``progress(steps)`` is
    called as training advances.
    """
    train_x, train_y, val_x, val_y = (torch.from_numpy(a) for a in data)
    torch.manual_seed(seed)
    model = Net(kind, train_x.shape[1], classes)
    lr = schedule.lr(batch)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay
    )
    order = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(train_y) // batch  # drop the last partial batch: every step has ``batch`` images
    total, step = schedule.epochs * steps_per_epoch, 0
    model.train()
    for _ in range(schedule.epochs):
        permutation = torch.randperm(len(train_y), generator=order)
        for i in range(steps_per_epoch):
            index = permutation[i * batch : (i + 1) * batch]
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1, (step + 1) / steps_per_epoch) * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = nn.functional.cross_entropy(model(train_x[index]), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            step += 1
            if step % 50 == 0 or step == total:
                progress(50 if step % 50 == 0 else step % 50)
    model.eval()  # BatchNorm now uses its running averages; the GroupNorm family needs no batch
    with torch.no_grad():
        wrong = sum(
            int((model(val_x[i : i + 500]).argmax(1) != val_y[i : i + 500]).sum()) for i in range(0, len(val_y), 500)
        )
    return wrong / len(val_y)


#: Per-step batch sizes, in the paper's order.
BATCHES = (32, 16, 8, 4, 2)


def run_all(dataset: Dataset, *, epochs: int, seed: int, threads: int) -> dict[str, Any]:
    """Train every (normalization, batch size) pair with rich progress bars; the results as a JSON-ready dict."""
    torch.set_num_threads(threads)
    schedule = Schedule(epochs)
    arrays = (dataset.train_x, dataset.train_y, dataset.val_x, dataset.val_y)
    errors: dict[str, dict[str, float]] = {kind: {} for kind in NORMS}
    seconds: dict[str, dict[str, float]] = {kind: {} for kind in NORMS}
    steps = {batch: epochs * (len(dataset.train_y) // batch) for batch in BATCHES}
    started = time.perf_counter()
    columns = (*Progress.get_default_columns(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        overall = progress.add_task("all 20 trainings", total=len(NORMS) * sum(steps.values()))
        for batch in BATCHES:
            for kind in NORMS:
                task = progress.add_task(f"{NORM_NAMES[kind]}, batch {batch}", total=steps[batch])

                def advance(n: int, task: TaskID = task) -> None:
                    progress.advance(task, n)
                    progress.advance(overall, n)

                t0 = time.perf_counter()
                errors[kind][str(batch)] = train_and_evaluate(
                    kind, batch, arrays, dataset.classes, schedule, seed=seed, progress=advance
                )
                seconds[kind][str(batch)] = round(time.perf_counter() - t0, 1)
                progress.remove_task(task)
    return {
        "data": dataset.description,
        "train_samples": len(dataset.train_y),
        "val_samples": len(dataset.val_y),
        "epochs": epochs,
        "learning_rate": f"{schedule.base_lr} * batch / 32, 1 epoch warm-up, cosine to 0",
        "optimizer": f"SGD, momentum {schedule.momentum}, weight decay {schedule.weight_decay}",
        "seed": seed,
        "threads": threads,
        "groupnorm_groups": GROUPS,
        "batch_sizes": list(BATCHES),
        "norms": NORM_NAMES,
        "val_error": errors,
        "train_seconds": seconds,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
