"""The ``groupnorm`` command: ``groupnorm demo`` and ``groupnorm bench``."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

#: sub-command -> module with ``add_arguments(parser)`` and ``run(args) -> int``, imported on use.
COMMANDS = {
    "demo": "groupnorm.demo",
    "bench": "groupnorm.bench",
}


def main(argv: Sequence[str] | None = None) -> int:
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
    return int(args.run(args))
