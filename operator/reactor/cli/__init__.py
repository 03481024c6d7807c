"""`reactor`: run tasks from the command line, clean up after crashes, run the operator,
read transcripts. One module per command; each adds its own subparser and imports its heavy
dependencies (kopf, the engine) only when it runs. Development tools (`dev-cluster`, the
dev forge) are not part of this package: the `reactor-dev` distribution under `dev/` adds
them through the `reactor.commands` entry point group, so they exist in the virtualenv that
`make setup` builds and not in the operator image."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

from reactor import __version__
from reactor.cli import cleanup, logs, operator, run
from reactor.cli.common import EXIT_FAILED, EXIT_USAGE
from reactor.errors import ConfigurationError, ReactorError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except ConfigurationError as exc:
        print(f"reactor: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ReactorError as exc:
        print(f"reactor: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reactor", description="Run AI coding agents in isolated cells with Test-Commit-Revert.")
    parser.add_argument("--version", action="version", version=f"reactor {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run.add_subparser(sub)
    cleanup.add_subparser(sub)
    operator.add_subparser(sub)
    logs.add_subparser(sub)
    for command in entry_points(group="reactor.commands"):
        command.load()(sub)  # each adds its own subparser
    return parser


def _configure_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)
