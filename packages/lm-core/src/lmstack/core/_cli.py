"""The ``lmstack`` command line: one entry point whose verbs come from the installed lmstack libraries.

Each verb is an entry point in the ``lmstack.commands`` group that names a ``register(subparsers)``
function. ``register`` adds its subparser and sets ``func`` (``func(args) -> int``) as a default::

    [project.entry-points."lmstack.commands"]
    generate = "lmstack.infer.cli:register_generate"

    def register_generate(subparsers: argparse._SubParsersAction) -> None:
        parser = subparsers.add_parser("generate", help="Generate text with a model.")
        parser.add_argument("model")
        parser.set_defaults(func=run_generate)

Installing a layer adds its verbs; a plugin that fails to load is reported and the rest still work.
This module is the only place in lmstack that configures logging.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import re
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from lmstack.core._errors import LMStackError

__all__ = ["ENTRY_POINT_GROUP", "build_parser", "main"]

ENTRY_POINT_GROUP = "lmstack.commands"

logger = logging.getLogger(__name__)


def _installed_distributions() -> list[tuple[str, str]]:
    """(name, version) of every installed ``lmstack-*`` distribution, sorted by name."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("lmstack-"):
            found.setdefault(name, dist.version)
    return sorted(found.items())


class _VersionAction(argparse.Action):
    """``--version``: print the installed lmstack distributions, looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        for name, version in _installed_distributions():
            print(f"{name} {version}")
        parser.exit()


def _add_plugin_commands(subparsers: argparse._SubParsersAction, *, verbose: bool) -> None:
    entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for entry_point in sorted(entry_points, key=lambda ep: ep.name):
        try:
            entry_point.load()(subparsers)
        except Exception as exc:  # a broken plugin must not take the other verbs down with it
            logger.warning(
                "skipping lmstack command %r (%s): %s: %s",
                entry_point.name,
                entry_point.value,
                type(exc).__name__,
                exc,
                exc_info=verbose,
            )


def build_parser(*, verbose: bool = False) -> argparse.ArgumentParser:
    """Build the ``lmstack`` parser with every verb registered in the ``lmstack.commands`` group.

    Args:
        verbose: Log a traceback for each plugin that fails to load.

    Returns:
        The top-level parser; each verb's subparser sets ``func`` in the parsed namespace.
    """
    parser = argparse.ArgumentParser(
        prog="lmstack",
        description="lmstack: define, train, serve, evaluate and use language models.",
        epilog="Run 'lmstack COMMAND --help' for a command's options. "
        "Installing an lmstack library adds its commands.",
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="print the installed lmstack libraries and exit"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more (-v: info, -vv: debug); give it before COMMAND",
    )
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    _add_plugin_commands(subparsers, verbose=verbose)
    return parser


def _count_verbose(argv: Sequence[str]) -> int:
    """Count -v/--verbose among the options before COMMAND (none of which takes a value)."""
    count = 0
    for arg in argv:
        if not arg.startswith("-") or arg == "--":
            break
        if arg == "--verbose":
            count += 1
        elif re.fullmatch(r"-v+", arg):
            count += len(arg) - 1
    return count


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lmstack`` command line.

    Args:
        argv: The arguments after the program name; ``sys.argv[1:]`` when None.

    Returns:
        The process exit status: the command's own, 2 for a usage error or an lmstack error
        (reported on one line, with the traceback only under ``-v``), 130 when interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # Logging must be set up before the plugins load, so -v is counted before the full parse.
    verbosity = _count_verbose(argv)
    _configure_logging(verbosity)

    parser = build_parser(verbose=verbosity > 0)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2

    func = getattr(args, "func", None)
    if func is None:
        print(f"error: command {args.command!r} did not register a function to run", file=sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except LMStackError as exc:
        if verbosity > 0:
            traceback.print_exc()
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"error: {message or type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
