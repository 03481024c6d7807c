"""`reactor cleanup`: kill servers and remove worktrees a crashed run left behind."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from reactor.cli.common import EXIT_OK


def add_subparser(sub: Any) -> None:
    parser = sub.add_parser("cleanup", help="kill servers and remove worktrees left by a crashed run")
    parser.add_argument("--repo", type=Path, default=None, help="also remove this repository's leftover worktrees and branches")
    parser.add_argument("--work-dir", type=Path, default=None, help="work dir of the crashed run (default: $REACTOR_WORK_DIR or ~/.local/state/reactor)")
    parser.set_defaults(func=cmd_cleanup)


def cmd_cleanup(args: argparse.Namespace) -> int:
    from reactor.infra.cleanup import cleanup_leftovers
    from reactor.workflow.engine import default_work_dir

    work_dir = (args.work_dir or default_work_dir()).expanduser().resolve()
    report = cleanup_leftovers(work_dir, args.repo)
    for line in report:
        print(line)
    if not report:
        print("nothing to clean up")
    return EXIT_OK
