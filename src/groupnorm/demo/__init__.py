"""Reproduce Group Normalization's batch-size result (Wu & He, 2018, Figure 1) at small scale.

Trains one small CNN with BatchNorm and with GroupNorm (groupnorm.torch.GroupNorm) at 32, 16, 8, 4 and
2 images per step, and with LayerNorm and InstanceNorm (GroupNorm with 1 and C groups) at 32, each with
three seeds, the same epochs and a learning rate scaled linearly with the batch. Then GroupNorm at
batch 32 once more with torch.nn.GroupNorm and on channels_last input and input with a large offset.
Prints the validation error tables (mean and spread over the seeds) and writes groupnorm-demo.json and
groupnorm-demo.png (validation error against batch size, with error bars) into --out.

The default data is generated on the spot (no download): grayscale 16x16 images of eight shapes over
background stripes, with pixel noise. --data FILE.npz uses your own images (see docs/demo.md for the
format).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

#: Default size of the run, and the size of ``--quick``: (synthetic images, epochs).
DEFAULT = (12000, 5)
QUICK = (2000, 2)
#: Trainings per table cell, each with its own initial weights and order.
SEEDS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the JSON and PNG (default: .)")
    parser.add_argument("--data", type=Path, help="your own data: an .npz file with arrays 'images' and 'labels'")
    parser.add_argument(
        "--quick", action="store_true", help=f"a small run ({QUICK[0]} images, {QUICK[1]} epochs) to try it out"
    )
    parser.add_argument("--epochs", type=int, help=f"epochs per training (default: {DEFAULT[1]}; --quick: {QUICK[1]})")
    parser.add_argument(
        "--samples", type=int, help=f"synthetic images to generate (default: {DEFAULT[0]}; --quick: {QUICK[0]})"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the data, and of the first training of each cell (default: 0)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=SEEDS,
        help=f"trainings per cell, with seeds --seed, --seed + 1, ... for the weights and order (default: {SEEDS})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="trainings run at the same time, each in its own process (default: 2, or 1 on a 1-core machine)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="PyTorch CPU threads of each worker (default: 1; networks this small gain little from more, and a "
        "busy machine makes extra threads much slower)",
    )


def run(args: argparse.Namespace) -> int:
    from groupnorm.demo import data

    samples, epochs = QUICK if args.quick else DEFAULT
    samples = samples if args.samples is None else args.samples
    epochs = epochs if args.epochs is None else args.epochs
    try:
        if min(epochs, args.threads, args.seeds, args.workers) < 1:
            raise ValueError("--epochs, --seeds, --workers and --threads must be at least 1.")
        if args.data is not None:
            dataset = data.load_npz(args.data, seed=args.seed)
        elif samples < data.MIN_SAMPLES:
            raise ValueError(f"--samples must be at least {data.MIN_SAMPLES}.")
        else:
            dataset = data.synthetic(samples, seed=args.seed)
        args.out.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as error:
        print(f"groupnorm demo: error: {error}", file=sys.stderr)
        return 2

    from groupnorm.demo import report
    from groupnorm.demo.train import run_all

    seeds = list(range(args.seed, args.seed + args.seeds))
    results = run_all(dataset, epochs=epochs, seeds=seeds, workers=args.workers, threads=args.threads)
    report.print_table(results)
    for path in (report.write_json(results, args.out), report.write_chart(results, args.out)):
        print(f"wrote {path}")
    return 0
