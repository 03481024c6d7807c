"""Thin, synchronous git runner. Reactor's own git operations (checkouts, commit, revert)
run here; the repository's tests never do (INV-006: they go through the OpenCode server).

Reactor's git never runs hooks and never honours the repository-local settings that make
git execute programs (a cell writes its own checkout's config; the operator must not run
what a cell wrote). Git commands *inside* a cell's checkout additionally run confined, in
the cell's own Landlock domain (see ``Worktree``), so a filter or alias that slipped through
still runs only with the cell's rights.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from reactor.errors import ReactorError
from reactor.infra import launcher

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
        wrap: Sequence[str] = (), inherit_env: bool = True, pass_fds: Sequence[int] = ()) -> str:
    """Run git in ``cwd`` and return its stdout (stripped unless ``strip`` is False).
    ``wrap`` prefixes the command line (the cell's confinement launcher); such a run, or one
    with ``inherit_env=False`` (it starts a program in a cell), gets a minimal environment."""
    inherit = inherit_env and not wrap
    base = os.environ if inherit else {k: os.environ[k] for k in _CELL_PASSTHROUGH if k in os.environ}
    full_env = {**base, **_GIT_ENV, **(env or {})}
    proc = subprocess.run(
        [*wrap, *git_command(*args)], cwd=cwd, env=full_env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        pass_fds=tuple(pass_fds),
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


class GitTimeout(GitError):
    """A git step in a cell's checkout ran past its deadline (a planted filter that hangs):
    the cell launcher killed it and everything it started."""

    def __init__(self, args: list[str], deadline: float, stderr: str):
        super().__init__(args, 124, stderr)
        self.deadline = deadline
        step = next((a for a in args if not a.startswith("-") and "=" not in a), "?")
        self.step = step
        self.message = (f"git {step} in the cell's checkout did not finish within {deadline:g}s and was killed, "
                        "with everything it started (a filter or hook of the checkout that hangs?)")

    def __str__(self) -> str:
        return self.message


# A git step's deadline when the caller gives none.
DEFAULT_CELL_GIT_DEADLINE = 60.0
# The operator's own deadline for the launcher beyond the step's (it is outside the cell and
# kills what is left within milliseconds; this only catches a launcher that cannot).
_LAUNCHER_SLACK = 5.0


def cell_git_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The whole environment of git run in a cell's checkout (nothing else of ours)."""
    base = {k: os.environ[k] for k in _CELL_PASSTHROUGH if k in os.environ}
    return {**base, **_GIT_ENV, **(env or {})}


def git_in_cell(cwd: Path | str, *args: str, policy: dict | None, deadline: float | None = None,
                env: dict[str, str] | None = None, check: bool = True, strip: bool = True) -> str:
    """Run git in a cell's checkout through the cell launcher: confined by ``policy`` (None:
    unconfined, still reaped), killed with everything it started after ``deadline`` seconds
    (GitTimeout, which names the step)."""
    deadline = DEFAULT_CELL_GIT_DEADLINE if deadline is None else deadline
    launch = launcher.prepare(git_command(*args), cell_git_env(env), policy, deadline=deadline, term_grace=0.0)
    try:
        proc = subprocess.Popen(launch.argv, cwd=cwd, env=launch.env, pass_fds=launch.pass_fds,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    finally:
        launch.close()
    try:
        out, err = proc.communicate(timeout=deadline + _LAUNCHER_SLACK)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise GitTimeout(list(args), deadline, err) from None
    if proc.returncode == launcher.EXIT_DEADLINE and "reactor-confine: deadline" in err:
        raise GitTimeout(list(args), deadline, err)
    if check and proc.returncode != 0:
        raise GitError(list(args), proc.returncode, err)
    return out.strip() if strip else out
