"""The network and its training: one small CNN, four normalization layers, five batch sizes, several seeds.

This is where the demo uses the library: ``groupnorm.torch.GroupNorm`` is a drop-in for
``torch.nn.GroupNorm``, and LayerNorm and InstanceNorm are its two extreme cases (one group; one group
per channel). BatchNorm is PyTorch's own ``BatchNorm2d``. The trainings run in worker processes (two by
default), each reporting its progress to the parent, which draws the progress bars.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import queue as queue_module
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
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

#: Per-step batch sizes, in the paper's order. BatchNorm and GroupNorm train at each (the paper's
#: Figure 1); LayerNorm and InstanceNorm, whose statistics are per image like GroupNorm's, at the first
#: only (the paper compares the four at 32 images per GPU).
BATCHES = (32, 16, 8, 4, 2)
SWEPT = ("BN", "GN")

#: The beyond-the-paper table: GroupNorm at batch 32 with each implementation, on each kind of input.
LAYERS = {"groupnorm": "groupnorm.torch.GroupNorm", "torch": "torch.nn.GroupNorm"}
INPUTS = {
    "contiguous": "NCHW",
    "channels_last": "channels_last",
    "contiguous+offset": "NCHW + 1e3",
    "channels_last+offset": "channels_last + 1e3",
}
#: Added to the first normalization's input in the ``+offset`` columns: about 1e3 times its spread.
OFFSET = 1e3

#: Channels of the four conv stages; the first keeps the resolution, the others halve it.
WIDTHS = (16, 32, 64, 128)


class Offset(nn.Module):
    """Adds a constant. In exact arithmetic a no-op before a normalization, which subtracts the mean again."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.value

    def extra_repr(self) -> str:
        return f"{self.value:g}"


def norm_layer(kind: str, channels: int, layer: str = "groupnorm") -> nn.Module:
    """The normalization layer ``kind`` for ``channels`` channels; ``layer`` picks the GroupNorm class."""
    if kind == "BN":
        return nn.BatchNorm2d(channels)  # per-batch statistics in training, running averages in evaluation
    groups = {"GN": GROUPS, "LN": 1, "IN": channels}[kind]
    if layer == "torch":
        return nn.GroupNorm(groups, channels)
    return GroupNorm(groups, channels)  # the drop-in for torch.nn.GroupNorm


class Net(nn.Module):
    """Four 3x3 conv -> norm -> ReLU stages (:data:`WIDTHS`; all but the first stride 2), global average, linear.

    16x16 images are 2x2 in the last stage, so BatchNorm at batch 2 has 8 values per channel there.
    ``offset`` is added to the first convolution's output (see :class:`Offset`).
    """

    def __init__(
        self, kind: str, in_channels: int, classes: int, *, layer: str = "groupnorm", offset: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, width in enumerate(WIDTHS):
            layers.append(nn.Conv2d(in_channels, width, 3, 1 if i == 0 else 2, 1, bias=False))
            if i == 0 and offset:
                layers.append(Offset(offset))
            layers += [norm_layer(kind, width, layer), nn.ReLU()]
            in_channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(in_channels, classes)

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


@dataclass(frozen=True)
class Job:
    """One training: normalization ``kind`` at ``batch`` images per step, weights and order from ``seed``."""

    kind: str
    batch: int
    seed: int
    layer: str = "groupnorm"  # which class implements LN, IN and GN: "groupnorm" or "torch"
    inputs: str = "contiguous"  # one of INPUTS

    def steps(self, train_samples: int, epochs: int) -> int:
        return epochs * (train_samples // self.batch)  # the last partial batch is dropped

    @property
    def label(self) -> str:
        name = f"{NORM_NAMES[self.kind]}, batch {self.batch}, seed {self.seed}"
        if (self.layer, self.inputs) != ("groupnorm", "contiguous"):
            name += f" ({LAYERS[self.layer]}, {INPUTS[self.inputs]})"
        return name


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def first_norm_error(norm: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest deviation of ``y``, the output of ``norm`` on ``x``, from the same GroupNorm in float64."""
    if not isinstance(norm, nn.GroupNorm):
        return 0.0  # BatchNorm is evaluated with its running averages: nothing is reduced over the input
    weight, bias = (p.detach().double() for p in (norm.weight, norm.bias))
    reference = nn.functional.group_norm(x.double(), norm.num_groups, weight, bias, norm.eps)
    return float((y.double() - reference).abs().max())


def train_and_evaluate(
    job: Job,
    data: Arrays,
    classes: int,
    schedule: Schedule,
    *,
    progress: Callable[[int], None] = lambda steps: None,
) -> dict[str, float]:
    """Train a fresh :class:`Net` as ``job`` says; its validation error, seconds and first-norm error.

    Every run with the same seed starts from the same weights and sees the training images in the same
    per-epoch orders. The learning rate warms up linearly to ``schedule.lr(batch)`` over the first epoch
    and decays to zero along a cosine. ``progress(steps)`` is called as training advances. BatchNorm
    trains on each batch's statistics and is evaluated with its running averages, as in the paper.
    """
    started = time.perf_counter()
    train_x, train_y, val_x, val_y = (torch.from_numpy(a) for a in data)
    torch.manual_seed(job.seed)
    model = Net(job.kind, train_x.shape[1], classes, layer=job.layer, offset=OFFSET if "offset" in job.inputs else 0)
    if job.inputs.startswith("channels_last"):
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs lack it
        train_x, val_x = (t.contiguous(memory_format=torch.channels_last) for t in (train_x, val_x))
    lr = schedule.lr(job.batch)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay
    )
    order = torch.Generator().manual_seed(job.seed)
    steps_per_epoch = len(train_y) // job.batch
    total, step = job.steps(len(train_y), schedule.epochs), 0
    model.train()
    for _ in range(schedule.epochs):
        permutation = torch.randperm(len(train_y), generator=order)
        for i in range(steps_per_epoch):
            index = permutation[i * job.batch : (i + 1) * job.batch]
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
    norm = next(m for m in model.features if isinstance(m, nn.GroupNorm | nn.BatchNorm2d))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep_first_chunk(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not seen:  # the first norm's input and output on the first 500 validation images
            seen.append((args[0], output))

    hook = norm.register_forward_hook(keep_first_chunk)
    with torch.no_grad():
        wrong = sum(
            int((model(val_x[i : i + 500]).argmax(1) != val_y[i : i + 500]).sum()) for i in range(0, len(val_y), 500)
        )
    hook.remove()
    return {
        "val_error": wrong / len(val_y),
        "seconds": time.perf_counter() - started,
        "norm_error": first_norm_error(norm, *seen[0]),
    }


def plan(seeds: list[int]) -> list[Job]:
    """Every training of a run: the batch-size table, then the extra table's trainings not already in it."""
    jobs = [
        Job(kind, batch, seed) for kind in NORMS for batch in BATCHES for seed in seeds if kind in SWEPT or batch == 32
    ]
    jobs += [
        Job("GN", 32, seed, layer, inputs)
        for layer in LAYERS
        for inputs in INPUTS
        for seed in seeds
        if (layer, inputs) != ("groupnorm", "contiguous")  # that one is GroupNorm at batch 32 above
    ]
    return jobs


# Worker processes: the arrays and settings arrive once per process, progress goes back through a queue.
_worker: dict[str, Any] = {}


def _start_worker(data: Arrays, classes: int, schedule: Schedule, threads: int, updates: Any) -> None:
    torch.set_num_threads(threads)
    _worker.update(data=data, classes=classes, schedule=schedule, updates=updates)


def _run_in_worker(index: int, job: Job) -> dict[str, float]:
    updates = _worker["updates"]
    updates.put((index, 0))
    return train_and_evaluate(
        job, _worker["data"], _worker["classes"], _worker["schedule"], progress=lambda n: updates.put((index, n))
    )


def _run_jobs(
    jobs: list[Job],
    data: Arrays,
    classes: int,
    schedule: Schedule,
    *,
    workers: int,
    threads: int,
    advance: Callable[[int, int], None],
    finished: Callable[[int], None],
) -> Iterator[tuple[int, dict[str, float]]]:
    """Run ``jobs`` (longest first) on ``workers`` processes; yield (index, result) as each one ends."""
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i].steps(len(data[1]), schedule.epochs))
    if workers == 1:
        torch.set_num_threads(threads)
        for i in order:
            advance(i, 0)
            result = train_and_evaluate(jobs[i], data, classes, schedule, progress=functools.partial(advance, i))
            finished(i)
            yield i, result
        return
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited torch threads or locks
    updates = context.Queue()
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(data, classes, schedule, threads, updates)
    ) as pool:
        pending: dict[Future[dict[str, float]], int] = {pool.submit(_run_in_worker, i, jobs[i]): i for i in order}
        while pending:
            done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            while True:
                try:
                    advance(*updates.get_nowait())
                except queue_module.Empty:
                    break
            for future in done:
                i = pending.pop(future)
                finished(i)
                yield i, future.result()


def run_all(dataset: Dataset, *, epochs: int, seeds: list[int], workers: int, threads: int) -> dict[str, Any]:
    """Every training of :func:`plan` with rich progress bars; the results as a JSON-ready dict."""
    schedule = Schedule(epochs)
    arrays = (dataset.train_x, dataset.train_y, dataset.val_x, dataset.val_y)
    jobs = plan(seeds)
    steps = [job.steps(len(dataset.train_y), epochs) for job in jobs]
    results: list[dict[str, float]] = [{} for _ in jobs]
    started = time.perf_counter()
    columns = (*Progress.get_default_columns(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        overall = progress.add_task(f"all {len(jobs)} trainings, {workers} at a time", total=sum(steps))
        tasks: dict[int, TaskID] = {}

        def advance(i: int, n: int) -> None:
            if i not in tasks and not results[i]:
                tasks[i] = progress.add_task(jobs[i].label, total=steps[i])
            if i in tasks:
                progress.advance(tasks[i], n)
            progress.advance(overall, n)

        def finished(i: int) -> None:
            if i in tasks:
                progress.remove_task(tasks.pop(i))

        for i, result in _run_jobs(
            jobs,
            arrays,
            dataset.classes,
            schedule,
            workers=workers,
            threads=threads,
            advance=advance,
            finished=finished,
        ):
            results[i] = result
        progress.update(overall, completed=sum(steps))

    def cells(key: str, select: Callable[[Job], str | None], inner: Callable[[Job], str]) -> dict[str, Any]:
        table: dict[str, dict[str, list[float]]] = {}
        for job, result in zip(jobs, results, strict=True):
            row = select(job)
            if row is not None:
                table.setdefault(row, {}).setdefault(inner(job), []).append(round(result[key], 6))
        return table

    def main_row(job: Job) -> str | None:
        return job.kind if (job.layer, job.inputs) == ("groupnorm", "contiguous") else None

    def extra_row(job: Job) -> str | None:
        return job.layer if job.kind == "GN" and job.batch == 32 else None

    return {
        "data": dataset.description,
        "train_samples": len(dataset.train_y),
        "val_samples": len(dataset.val_y),
        "network": f"4 conv stages ({', '.join(map(str, WIDTHS))} channels), global average, linear",
        "epochs": epochs,
        "learning_rate": f"{schedule.base_lr} * batch / 32, 1 epoch warm-up, cosine to 0",
        "optimizer": f"SGD, momentum {schedule.momentum}, weight decay {schedule.weight_decay}",
        "seeds": seeds,
        "workers": workers,
        "threads": threads,
        "groupnorm_groups": GROUPS,
        "batch_sizes": list(BATCHES),
        "norms": NORM_NAMES,
        "val_error": cells("val_error", main_row, lambda job: str(job.batch)),
        "train_seconds": cells("seconds", main_row, lambda job: str(job.batch)),
        "extra": {
            "about": "GroupNorm at batch 32, each implementation on each kind of input",
            "offset": OFFSET,
            "layers": LAYERS,
            "inputs": INPUTS,
            "val_error": cells("val_error", extra_row, lambda job: job.inputs),
            "norm_error": cells("norm_error", extra_row, lambda job: job.inputs),
        },
        "total_seconds": round(time.perf_counter() - started, 1),
    }
