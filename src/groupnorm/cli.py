"""The ``groupnorm`` command: ``groupnorm demo`` and ``groupnorm bench``.

Each sub-command checks, right after its arguments are parsed and before it does any work, that the
optional packages it needs are installed, and otherwise names the extra that installs them
(``pip install 'groupnorm[demo]'``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["BENCH_FRAMEWORKS", "COMMANDS", "DEMO", "PLOT", "Needs", "main", "missing_modules"]

COMMANDS = {
    "demo": "groupnorm.demo",
    "bench": "groupnorm.bench",
}
"""Sub-command -> module with ``add_arguments(parser)`` and ``run(args) -> int``, imported on use."""

EXIT_MISSING = 1
"""Exit status of a command whose optional dependencies are missing (2 is taken by bad arguments)."""


@dataclass(frozen=True)
class Needs:
    """Optional packages a command (or one of its options) needs, and the extras that install them.

    Args:
        modules: top-level import names, checked without importing them (``("torch", "rich")``).
        extras: the package's extras that together install every one of ``modules`` (``("demo",)``).
        what: what needs them, as the error message says it (``"groupnorm demo"``).

    Example:
        >>> needs = Needs(("matplotlib",), ("bench",), "groupnorm bench --plot")
        >>> needs.install_command()
        "pip install 'groupnorm[bench]'"
    """

    modules: tuple[str, ...]
    extras: tuple[str, ...]
    what: str

    def install_command(self) -> str:
        """The ``pip`` command that installs what is needed: ``pip install 'groupnorm[EXTRA,...]'``."""
        return f"pip install 'groupnorm[{','.join(self.extras)}]'"

    def missing(self) -> list[str]:
        """The entries of `modules` that are not installed, in order (see `missing_modules`)."""
        return missing_modules(self.modules)

    def problem(self) -> str | None:
        """``None`` when everything is installed, else a one-line message naming the missing modules and
        the command that installs them."""
        missing = self.missing()
        if not missing:
            return None
        needed, absent = _names(self.modules), _names(missing)
        return f"{self.what} needs {needed}; not installed: {absent}. Install them: {self.install_command()}"


DEMO = Needs(("torch", "rich", "matplotlib"), ("demo",), "groupnorm demo")
"""``groupnorm demo`` trains with PyTorch, shows progress and tables with rich, draws with matplotlib."""

PLOT = Needs(("matplotlib",), ("bench",), "groupnorm bench --plot")
"""``groupnorm bench --plot`` draws its chart with matplotlib."""

BENCH_FRAMEWORKS = {
    "numpy": Needs((), (), "groupnorm bench --framework numpy"),
    "torch": Needs(("torch",), ("torch",), "groupnorm bench --framework torch"),
    "keras": Needs(("keras", "tensorflow"), ("keras", "tf"), "groupnorm bench --framework keras"),
    "tf1": Needs(("tensorflow",), ("tf",), "groupnorm bench --framework tf1"),
    "flax": Needs(("jax", "flax"), ("jax",), "groupnorm bench --framework flax"),
}
"""``groupnorm bench --framework NAME``: what groupnorm's front-end for NAME imports. A framework that is missing
is reported as ``missing`` in the tables (the others still run); the command stops only when every framework
asked for is missing."""


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The top-level modules of ``modules`` that cannot be imported here, found without importing any.

    Args:
        modules: top-level import names, such as ``"torch"`` or ``"matplotlib"`` (not dotted names).

    Returns:
        The missing ones, in the order given; an empty list when all are installed.

    Example:
        >>> missing_modules(["numpy", "surely_not_installed_anywhere"])
        ['surely_not_installed_anywhere']
    """
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken or half-imported module counts as missing
            found = False
        if not found:
            missing.append(name)
    return missing


def _names(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _check_demo(args: argparse.Namespace) -> list[str]:
    problem = DEMO.problem()
    return [problem] if problem else []


def _check_bench(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.plot:
        problem = PLOT.problem()
        if problem:
            problems.append(problem)
    if not args.load:
        frameworks = [name for name in args.framework if name in BENCH_FRAMEWORKS]
        absent = [name for name in frameworks if BENCH_FRAMEWORKS[name].missing()]
        if frameworks and len(absent) == len(frameworks):
            problems += [str(BENCH_FRAMEWORKS[name].problem()) for name in absent]
        else:
            for name in absent:
                needs = BENCH_FRAMEWORKS[name]
                print(
                    f"groupnorm bench: {name} is reported as missing ({_names(needs.missing())} not installed; "
                    f"{needs.install_command()})",
                    file=sys.stderr,
                )
    return problems


_CHECKS: dict[str, Callable[[argparse.Namespace], list[str]]] = {"demo": _check_demo, "bench": _check_bench}
"""Sub-command -> its dependency check: the messages of what is missing (none: it may run)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``groupnorm`` command line (what the ``groupnorm`` script and ``python -m groupnorm`` call).

    Args:
        argv: the arguments after the program's name; ``None`` (the default) reads ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 2 for bad arguments, 1 when an optional dependency is missing
        (the message on stderr names the extra that installs it). ``--help`` and argument errors exit
        through ``SystemExit``, as ``argparse`` does.

    Example:
        The NumPy benchmark of a small input, as ``groupnorm bench -f numpy --shape 2,8,8,16 --groups 4 -q``
        would run it (it prints its tables and returns 0):

        ```python
        from groupnorm.cli import main

        status = main(["bench", "-f", "numpy", "--shape", "2,8,8,16", "--groups", "4", "-q"])
        ```
    """
    parser = argparse.ArgumentParser(prog="groupnorm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        summary = (module.__doc__ or "").strip().splitlines()[0]
        command = sub.add_parser(
            name, help=summary, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    problems = _CHECKS[args.command](args) if args.command in _CHECKS else []
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_MISSING
    return int(args.run(args))
