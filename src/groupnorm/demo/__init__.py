"""Reproduce Group Normalization's batch-size result (Wu & He, 2018, Figure 1) at small scale.

Trains one small CNN 20 times: each of BatchNorm, LayerNorm, InstanceNorm and GroupNorm (the last three
with groupnorm.torch.GroupNorm) at 32, 16, 8, 4 and 2 images per step, with the same seeds, the same
epochs and a learning rate scaled linearly with the batch. Prints the validation error table and writes
groupnorm-demo.json and groupnorm-demo.png (validation error against batch size) into --out.

The default data is generated on the spot (no download): grayscale 16x16 images of eight shapes with
per-image brightness, contrast, background stripes and noise. --data FILE.npz uses your own images
(see docs/demo.md for the format).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: Default size of the run, and the size of ``--quick``: (synthetic images, epochs).
DEFAULT = (3000, 10)
QUICK = (800, 2)


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
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the weights and the order (default: 0)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="PyTorch CPU threads (default: 1; networks this small gain little from more, and a busy machine "
        "makes extra threads much slower)",
    )


def run(args: argparse.Namespace) -> int:
    from groupnorm.demo import data

    samples, epochs = QUICK if args.quick else DEFAULT
    samples, epochs = args.samples or samples, args.epochs or epochs
    try:
        if epochs < 1 or args.threads < 1:
            raise ValueError("--epochs and --threads must be at least 1.")
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

    results = run_all(dataset, epochs=epochs, seed=args.seed, threads=args.threads)
    report.print_table(results)
    for path in (report.write_json(results, args.out), report.write_chart(results, args.out)):
        print(f"wrote {path}")
    return 0
