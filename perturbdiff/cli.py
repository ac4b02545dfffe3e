"""The ``perturbdiff`` console command.

Each subcommand lives next to the code it drives and registers itself through ``add_parser``
functions listed in ``_SUBCOMMANDS``; this module only dispatches, and imports a subcommand's
module when that subcommand runs (so ``perturbdiff --help`` stays fast).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> "module:function" that adds the subparser (the function sets ``func`` on it).
_SUBCOMMANDS: dict[str, str] = {
    "atlas": "perturbdiff.data.cli:add_parser",
    "predict": "perturbdiff.pipeline:add_parser",
    "evaluate": "perturbdiff.evaluation:add_parser",
    "features": "perturbdiff.features:add_parser",
}


class ShowDefaults(argparse.HelpFormatter):
    """Help that states each option's default, where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not any(action.default is v for v in (None, False, argparse.SUPPRESS)) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="perturbdiff", description="PerturbDiff command-line tools")
    parser.add_argument("--version", action="version", version=f"perturbdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, target in _SUBCOMMANDS.items():
        module_name, func_name = target.split(":")
        try:
            add_parser = getattr(importlib.import_module(module_name), func_name)
        except ModuleNotFoundError as err:  # a subcommand whose module is not installed
            if err.name and module_name.startswith(err.name):
                continue
            raise
        add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data.remote import RemoteStoreError

    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, RemoteStoreError) as err:
        print(f"perturbdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
