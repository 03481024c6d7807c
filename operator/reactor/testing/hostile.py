"""Hostile files for the trust-boundary tests: a global git config whose every way of
running a program leaves a mark, and a cell that plants links in its own state dir."""

from __future__ import annotations

import shlex
from pathlib import Path


def hostile_git_config(home: Path, marker: Path) -> Path:
    """A home dir whose ~/.gitconfig (and XDG git config) would run ``touch marker`` from a
    filter on every file, a hook, fsmonitor, a pager and an alias, if git read it."""
    touch = f"touch {shlex.quote(str(marker))}"
    hooks = home / "hooks"
    hooks.mkdir(parents=True, exist_ok=True)
    for hook in ("post-checkout", "pre-commit", "post-commit", "reference-transaction", "pre-push"):
        (hooks / hook).write_text(f"#!/bin/sh\n{touch}\n")
        (hooks / hook).chmod(0o755)
    (home / "attributes").write_text("* filter=owned diff=owned\n")
    config = f"""[core]
\tattributesFile = {home / "attributes"}
\thooksPath = {hooks}
\tfsmonitor = {touch}; false
\tpager = {touch}; cat
[filter "owned"]
\tclean = {touch}; cat
\tsmudge = {touch}; cat
\tprocess = {touch}
\trequired = false
[diff "owned"]
\ttextconv = {touch}; cat
[alias]
\tstatus = !{touch}
"""
    (home / ".gitconfig").write_text(config)
    (home / ".config" / "git").mkdir(parents=True, exist_ok=True)
    (home / ".config" / "git" / "config").write_text(config)
    (home / ".config" / "git" / "attributes").write_text("* filter=owned\n")
    return home
