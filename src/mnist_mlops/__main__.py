"""The command line: `python -m mnist_mlops COMMAND` (or `mnist-mlops COMMAND`).

A table of contents: each wing declares its own commands in its `commands.py`
(`add_commands(subparsers)`, each command's `run` set as a default), and this
module only assembles them. A command imports what it needs when it runs, so
`serve` works in an environment that holds only the served model's
requirements, and `--help` never waits for TensorFlow.
"""

import argparse
import importlib
import sys

from mnist_mlops.processes import collect_less

# The order of `mnist-mlops --help`: the lifecycle, from data to the team's server.
WINGS = ("pipeline", "tracking", "serving", "batch", "monitoring", "tuning", "team")


class DefaultsShown(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none or says it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if (
            "%(default)" not in help_text
            and action.default not in (None, False, argparse.SUPPRESS)
            and (
                action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
            )
        ):
            help_text += " (%(default)s)" if help_text else "(%(default)s)"
        return help_text


class CommandParser(argparse.ArgumentParser):
    """A command's parser: its defaults in its `--help`."""

    def __init__(self, *arguments, **settings) -> None:
        settings.setdefault("formatter_class", DefaultsShown)
        super().__init__(*arguments, **settings)


def parser() -> argparse.ArgumentParser:
    """The whole command line, assembled from the wings' own commands."""
    top = CommandParser(prog="mnist-mlops", description=__doc__.splitlines()[0])
    commands = top.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=CommandParser
    )
    for wing in WINGS:
        importlib.import_module(f"mnist_mlops.{wing}.commands").add_commands(commands)
    return top


def main(argv: list[str] | None = None) -> int:
    collect_less()
    arguments = parser().parse_args(argv)
    return arguments.run(arguments)


if __name__ == "__main__":
    sys.exit(main())
