"""The `styleheat` command line: one subcommand per module in ``server.commands``."""
from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `styleheat --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "server.commands.download",
    "server.commands.doctor",
    "server.commands.ping",
    "server.commands.align",
    "server.commands.extract",
    "server.commands.audio",
    "server.commands.verify_reference",
    "server.commands.render",
    "server.commands.dub",
    "server.commands.farm",
    "server.commands.convert",
    "server.commands.prepare_data",
    "server.commands.train",
    "server.commands.evaluate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="styleheat",
        description="StyleHEAT talking-face tools: fetch weights, check them, render, serve Blender.",
        epilog="Run 'styleheat COMMAND --help' for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        mod = importlib.import_module(name)
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("styleheat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
