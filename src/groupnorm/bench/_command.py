"""Argument parsing and the command's flow."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import groupnorm
from groupnorm.bench import _report, _runner, _sweep
from groupnorm.bench._core import DEVICES, FRAMEWORKS, LAYOUTS, MODES, SWEEPS, Spec, make_data

DEFAULT_SHAPE = (8, 32, 32, 64)
_DEFAULT = ",".join(map(str, DEFAULT_SHAPE))
ACTIVATIONS = ("none", "relu", "silu", "gelu")
DTYPES = ("float32", "float16", "float64")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is comma-separated ints, like 8,32,32,64; got {text!r}") from None
    if len(shape) < 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"a shape needs a batch, a channel and a spatial axis, all >= 1; got {text!r}")
    return shape


def _frameworks(text: str) -> list[str]:
    names = list(FRAMEWORKS) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in FRAMEWORKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"frameworks are 'all' or some of {', '.join(FRAMEWORKS)}; got {text!r}")
    return names


def _threads(text: str) -> list[int]:
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"threads are positive ints, comma-separated (like 1,2); got {text!r}")
    return counts


#: frameworks whose thread count can change between runs of one process (the others take it at start-up)
_RUNTIME_THREADS = ("numpy", "torch")

#: seconds of timed rounds per shape, framework and mode that ``--sweep`` aims at (``--budget``)
SWEEP_BUDGET_S = 2.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--framework",
        "-f",
        type=_frameworks,
        default=list(FRAMEWORKS),
        metavar="NAMES",
        help=f"comma-separated, from {', '.join(FRAMEWORKS)}, or 'all' (default: all)",
    )
    parser.add_argument(
        "--shape",
        type=_shape,
        default=DEFAULT_SHAPE,
        metavar="N,..",
        help=f"input shape in --layout order, e.g. 16,256,64,64 for NCHW (default: {_DEFAULT})",
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="NHWC",
        help="axis order of --shape; NumPy, Keras and tf1 run it as given, torch always runs NCHW "
        "(contiguous and channels_last), Flax always NHWC (default: %(default)s)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="(default: %(default)s)")
    parser.add_argument("--groups", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--epsilon", type=float, default=1e-5, help="the same for every layer (default: %(default)s)")
    parser.add_argument(
        "--activation", choices=ACTIVATIONS, default="none", help="fused by groupnorm, applied after by peers"
    )
    parser.add_argument(
        "--mode",
        choices=(*MODES, "both"),
        default="both",
        help="forward, forward+backward (gradients of sum(y * dy) w.r.t. input and parameters) or both "
        "(default: %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (default: %(default)s)")
    parser.add_argument(
        "--min-time",
        type=float,
        default=0.02,
        metavar="SECONDS",
        help="repeat a call within a round until a sample lasts this long (default: %(default)s)",
    )
    parser.add_argument(
        "--accuracy", action="store_true", help="measure accuracy against float64 (instead of speed, unless --speed)"
    )
    parser.add_argument("--speed", action="store_true", help="measure speed too when --accuracy is given")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON (schema: docs/benchmarks.md)")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG chart of the ratios and accuracy")
    parser.add_argument("--markdown", metavar="PATH", help="write the tables in Markdown")
    parser.add_argument(
        "--load", nargs="+", metavar="JSON", help="measure nothing: show (and --plot, --json) saved results, merged"
    )
    parser.add_argument(
        "--threads",
        type=_threads,
        default=None,
        metavar="N[,N..]",
        help="threads per framework (default: each framework's own); 1 gives steadier figures on a busy machine; "
        "several (1,2) measure each in turn (torch and numpy only)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="instead of --shape and --layout, measure each framework's list of model shapes (torch: ten "
        "Stable-Diffusion-like NCHW shapes, 2x32x8x8 to 16x256x64x64) and summarize: geometric means of the "
        "ratios, the worst forward ratio, the smallest shape's per-call times, time against the copy floor",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="fewer timed rounds (at least 3) where --repeats of them would take longer than this, per shape, "
        f"framework and mode (default: {SWEEP_BUDGET_S:g} with --sweep, no limit without)",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="where the tensors live; other than cpu, a framework needs its own module "
        "(groupnorm.bench.fw_torch_cuda) and is reported missing without one (default: %(default)s)",
    )
    parser.add_argument(
        "--mean-over-std",
        type=float,
        default=0.0,
        metavar="RATIO",
        help="speed data: every group's mean is RATIO times its spread (implementations may take another path "
        "for data with a large mean; default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def spec_from(args: argparse.Namespace) -> Spec:
    """The configuration ``args`` describe, validated by groupnorm's own plan."""
    spec = Spec(
        shape=tuple(args.shape),
        layout=args.layout,
        dtype=args.dtype,
        groups=args.groups,
        epsilon=args.epsilon,
        activation=None if args.activation == "none" else args.activation,
    )
    groupnorm.make_plan(
        spec.shape,
        spec.dtype,
        groups=spec.groups,
        channels_axis=spec.channels_axis,
        reduction_axes=spec.reduction_axes,
        epsilon=spec.epsilon,
    )
    return spec


@contextmanager
def _progress(total: int, quiet: bool) -> Iterator[_runner.Progress]:
    if quiet:
        yield lambda n, d: None
        return
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:  # pragma: no cover - rich comes with the bench extra
        yield lambda n, d: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True, console=None) as bar:
        task = bar.add_task("starting", total=total)

        def advance(n: int, description: str) -> None:
            bar.update(task, advance=n, description=description)

        yield advance


_MEASURED = (
    "framework",
    "shape",
    "layout",
    "dtype",
    "groups",
    "epsilon",
    "activation",
    "mode",
    "repeats",
    "warmup",
    "min_time",
    "accuracy",
    "speed",
    "threads",
    "sweep",
    "budget",
    "device",
    "mean_over_std",
    "seed",
)


#: environment variables that change which code groupnorm runs (see the torch backend)
_SETTINGS = ("GROUPNORM_CPU_KERNEL", "GROUPNORM_HUGE_PAGES")


def command_line(args: argparse.Namespace) -> str:
    """The command that measures what ``args`` measure: every option that differs from its default, after
    the ``GROUPNORM_*`` environment variables that change what groupnorm runs."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = parser.parse_args([])
    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k in _SETTINGS]
    words = [*env, "groupnorm", "bench"]
    for name in _MEASURED:
        value = getattr(args, name)
        if value == getattr(defaults, name):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag)
        elif isinstance(value, list | tuple):
            words += [flag, ",".join(map(str, value))]
        else:
            words += [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


def _specs(args: argparse.Namespace) -> list[tuple[str | None, Spec, list[str]]]:
    """(sweep name or None, configuration, frameworks) for every configuration ``args`` ask for."""
    if not args.sweep:
        return [(None, spec_from(args), list(args.framework))]
    out: list[tuple[str | None, Spec, list[str]]] = []
    for framework in args.framework:
        sweep = SWEEPS[framework]
        for shape in sweep.shapes:
            spec = Spec(
                shape=shape,
                layout=sweep.layout,
                dtype=args.dtype,
                groups=args.groups,
                epsilon=args.epsilon,
                activation=None if args.activation == "none" else args.activation,
            )
            groupnorm.make_plan(
                spec.shape,
                spec.dtype,
                groups=spec.groups,
                channels_axis=spec.channels_axis,
                reduction_axes=spec.reduction_axes,
                epsilon=spec.epsilon,
            )
            out.append((framework, spec, [framework]))
    return out


def check(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` for what cannot be measured as asked, before anything runs."""
    if args.sweep:
        missing = [f for f in args.framework if f not in SWEEPS]
        if missing:
            raise ValueError(
                f"--sweep has shapes for {', '.join(SWEEPS)} only, not for {', '.join(missing)} (pick with -f)"
            )
        if args.accuracy:
            raise ValueError("--sweep measures speed; run --accuracy without it")
    if args.threads and len(args.threads) > 1:
        fixed = [f for f in args.framework if f not in _RUNTIME_THREADS]
        if fixed:
            raise ValueError(
                "several thread counts need frameworks that change threads while running "
                f"({', '.join(_RUNTIME_THREADS)}); {', '.join(fixed)} take theirs at start-up: one process per count"
            )
    _specs(args)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run what ``args`` ask for; returns the JSON document."""
    specs = _specs(args)
    modes = list(MODES) if args.mode == "both" else [args.mode]
    speed = args.speed or not args.accuracy
    thread_counts: list[int | None] = list(args.threads) if args.threads else [None]
    budget = args.budget if args.budget is not None else (SWEEP_BUDGET_S if args.sweep else None)
    per_run = sum(
        (len(fws) * len(modes) * (args.repeats + 1) if speed else 0)
        + (len(fws) * len(_runner.ACCURACY_CASES) if args.accuracy else 0)
        for _, _, fws in specs
    )
    runs: list[dict[str, Any]] = []
    command = command_line(args)
    with _progress(per_run * len(thread_counts), args.quiet or not sys.stderr.isatty()) as progress:
        for sweep, spec, frameworks in specs:
            data = make_data(spec, mean_over_std=args.mean_over_std, seed=args.seed) if speed else None
            for threads in thread_counts:
                _runner.set_threads(threads)
                rows: list[dict[str, Any]] = []
                comparisons: list[dict[str, Any]] = []
                accuracy: list[dict[str, Any]] = []
                if speed:
                    rows, comparisons = _runner.run_speed(
                        spec,
                        frameworks,
                        modes,
                        warmup=args.warmup,
                        repeats=args.repeats,
                        min_sample_s=args.min_time,
                        seed=args.seed,
                        mean_over_std=args.mean_over_std,
                        budget_s=budget,
                        primary_only=bool(sweep),
                        device=args.device,
                        data=data,
                        progress=progress,
                    )
                if args.accuracy:
                    accuracy = _runner.run_accuracy(
                        spec, frameworks, seed=args.seed, device=args.device, progress=progress
                    )
                config = {
                    **spec.describe(),
                    "frameworks": frameworks,
                    "modes": modes if speed else [],
                    "repeats": args.repeats,
                    "warmup": args.warmup,
                    "min_sample_s": args.min_time,
                    "seed": args.seed,
                    "mean_over_std": args.mean_over_std,
                    "threads": threads,
                    "sweep": sweep,
                    "device": args.device,
                }
                runs.append(
                    {
                        "command": command,
                        "config": config,
                        "speed": rows,
                        "comparisons": comparisons,
                        "accuracy": accuracy,
                    }
                )
            del data
    return {
        "schema": _report.SCHEMA_ID,
        "groupnorm_version": groupnorm.__version__,
        "created": _report.now(),
        "machine": _report.machine(),
        "runs": runs,
        "sweeps": _sweep.summarize(runs),
    }


def load(paths: Sequence[str]) -> dict[str, Any]:
    """Saved documents merged into one (the first one's machine and date)."""
    docs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        errors = _report.validate(doc)
        if errors:
            raise ValueError(f"{path} is not a groupnorm bench document: {'; '.join(errors[:5])}")
        docs.append(doc)
    runs = [run for doc in docs for run in doc["runs"]]
    return {**docs[0], "runs": runs, "sweeps": _sweep.summarize(runs)}


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up log would bury the tables
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # and so would its notes on tracing many functions
    if args.load:
        try:
            doc = load(args.load)
        except (OSError, ValueError) as e:
            print(f"groupnorm bench: {e}", file=sys.stderr)
            return 2
    else:
        try:
            check(args)
        except (TypeError, ValueError) as e:
            print(f"groupnorm bench: {e}", file=sys.stderr)
            return 2
        doc = measure(args)
    _report.print_tables(doc)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(_report.markdown(doc))
    if args.plot:
        _report.plot(doc, args.plot)
    return 0
