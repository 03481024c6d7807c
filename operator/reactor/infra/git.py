"""Thin, synchronous git runner. Reactor's own git operations (checkouts, commit, revert)
run here; the repository's tests never do (INV-006: they go through the OpenCode server).

Reactor's git never runs hooks and never honours the repository-local settings that make
git execute programs (a cell writes its own checkout's config; the operator must not run
what a cell wrote). Git commands *inside* a cell's checkout additionally run confined, in
the cell's own Landlock domain (see ``Worktree``), so a filter or alias that slipped through
still runs only with the cell's rights.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from reactor.errors import ReactorError

# Never let git wait for a password on a terminal, nor read the user's global hooks or editor.
_GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_EDITOR": "true", "GIT_ASKPASS": "true", "SSH_ASKPASS": "true"}
# Settings that run programs, neutralised on every command line (command-line -c wins over
# any config file). Filter drivers (`filter.<name>.clean`, named from .gitattributes) cannot
# be switched off wholesale this way: that is why git in a cell's checkout runs confined.
HARDENED = (
    "-c", "core.hooksPath=/dev/null",
    "-c", "core.fsmonitor=false",
    "-c", "core.sshCommand=ssh",
    "-c", "core.pager=cat",
    "-c", "core.editor=true",
    "-c", "core.askPass=",
    "-c", "credential.helper=",
    "-c", "diff.external=",
    "-c", "gc.auto=0",
    "-c", "protocol.ext.allow=never",
)


class GitError(ReactorError):
    def __init__(self, args: list[str], returncode: int, stderr: str):
        self.args_ = args
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"git {' '.join(args)} failed ({returncode}): {self.stderr}")


def git_command(*args: str) -> list[str]:
    return ["git", *HARDENED, *args]


# What git in a cell's checkout inherits of our environment: nothing else (the operator's
# environment is not the cell's business).
_CELL_PASSTHROUGH = ("PATH", "LANG", "LC_ALL", "TZ")


def git(cwd: Path | str, *args: str, check: bool = True, env: dict[str, str] | None = None, strip: bool = True,
        wrap: Sequence[str] = (), inherit_env: bool = True) -> str:
    """Run git in ``cwd`` and return its stdout (stripped unless ``strip`` is False).
    ``wrap`` prefixes the command line (the cell's confinement launcher); such a run, or one
    with ``inherit_env=False`` (it starts a program in a cell), gets a minimal environment."""
    inherit = inherit_env and not wrap
    base = os.environ if inherit else {k: os.environ[k] for k in _CELL_PASSTHROUGH if k in os.environ}
    full_env = {**base, **_GIT_ENV, **(env or {})}
    proc = subprocess.run(
        [*wrap, *git_command(*args)], cwd=cwd, env=full_env, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    if check and proc.returncode != 0:
        raise GitError(list(args), proc.returncode, proc.stderr)
    return proc.stdout.strip() if strip else proc.stdout


def git_ok(cwd: Path | str, *args: str) -> bool:
    """True when the git command exits 0 (for questions such as 'does this ref exist')."""
    proc = subprocess.run(
        git_command(*args), cwd=cwd, env={**os.environ, **_GIT_ENV}, stdin=subprocess.DEVNULL, capture_output=True
    )
    return proc.returncode == 0


def git_status(cwd: Path | str, *args: str) -> subprocess.CompletedProcess:
    """Run git and return the finished process, for commands whose exit status is an answer
    rather than a failure (`merge-tree`: 1 = conflicts)."""
    return subprocess.run(git_command(*args), cwd=cwd, env={**os.environ, **_GIT_ENV}, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)
