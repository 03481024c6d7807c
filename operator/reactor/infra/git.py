"""Thin, synchronous git runner. Reactor's own git operations (worktrees, commit, revert)
run here; the repository's tests never do (INV-006: they go through the OpenCode server)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from reactor.errors import ReactorError

# Never let git wait for a password on a terminal, nor read the user's global hooks or editor.
_GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_EDITOR": "true", "GIT_ASKPASS": "true", "SSH_ASKPASS": "true"}


class GitError(ReactorError):
    def __init__(self, args: list[str], returncode: int, stderr: str):
        self.args_ = args
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"git {' '.join(args)} failed ({returncode}): {self.stderr}")


def git(cwd: Path | str, *args: str, check: bool = True, env: dict[str, str] | None = None, strip: bool = True) -> str:
    """Run git in ``cwd`` and return its stdout (stripped unless ``strip`` is False)."""
    full_env = {**os.environ, **_GIT_ENV, **(env or {})}
    proc = subprocess.run(
        ["git", *args], cwd=cwd, env=full_env, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    if check and proc.returncode != 0:
        raise GitError(list(args), proc.returncode, proc.stderr)
    return proc.stdout.strip() if strip else proc.stdout


def git_ok(cwd: Path | str, *args: str) -> bool:
    """True when the git command exits 0 (for questions such as 'does this ref exist')."""
    proc = subprocess.run(
        ["git", *args], cwd=cwd, env={**os.environ, **_GIT_ENV}, stdin=subprocess.DEVNULL, capture_output=True
    )
    return proc.returncode == 0
