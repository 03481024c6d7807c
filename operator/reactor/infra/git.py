"""Thin, synchronous git runner. Reactor's own git operations (checkouts, commit, revert)
run here; the repository's tests never do (they run through the cell's OpenCode server).

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
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from reactor.errors import ReactorError
from reactor.infra import launcher, private

# Never let git wait for a password on a terminal, nor read the user's global hooks or editor.
# No global or system config either: a filter or alias in ~/.gitconfig (a file a cell may
# once have reached) must never run with the operator's rights. HOME and XDG_CONFIG_HOME
# point at the operator's own empty dir (``private.git_home()``), set per run.
_GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_EDITOR": "true", "GIT_ASKPASS": "true", "SSH_ASKPASS": "true",
            "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_ATTR_NOSYSTEM": "1"}
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


class GitTimeout(GitError):
    """A git step ran past its deadline (a planted filter that hangs) and was killed with
    everything it started."""

    def __init__(self, args: list[str], deadline: float, stderr: str = ""):
        super().__init__(args, 124, stderr)
        self.deadline = self.timeout = deadline
        words, self.step = iter(args), "?"
        for word in words:  # the subcommand (`add`), for messages
            if word == "-c":
                next(words, None)
            elif not word.startswith("-"):
                self.step = word
                break
        self.message = (f"git {self.step} did not finish within {deadline:g}s and was killed, with everything "
                        "it started (a filter or hook of the checkout that hangs?)")

    def __str__(self) -> str:
        return self.message


def git_env(base: Mapping[str, str] | None = None, *, home: bool = True) -> dict[str, str]:
    """The environment of an operator's git run: ``base`` (default: ours) without any
    GIT_* variable (GIT_CONFIG_COUNT and friends are config too), plus the fixed settings
    above. ``home``: HOME and XDG_CONFIG_HOME are the operator's empty private dir (a run
    inside a cell gets neither: it has no business there)."""
    base = os.environ if base is None else base
    env = {k: v for k, v in base.items() if not k.startswith("GIT_") and k not in ("HOME", "XDG_CONFIG_HOME")}
    env.update(_GIT_ENV)
    if home:
        git_home = str(private.git_home())
        env.update(HOME=git_home, XDG_CONFIG_HOME=os.path.join(git_home, ".config"))
    return env


def git(cwd: Path | str, *args: str, check: bool = True, env: dict[str, str] | None = None, strip: bool = True,
        wrap: Sequence[str] = (), inherit_env: bool = True, pass_fds: Sequence[int] = (),
        timeout: float | None = None, track: set[subprocess.Popen] | None = None, stdin: bytes | None = None) -> str:
    """Run git in ``cwd`` and return its stdout (stripped unless ``strip`` is False).
    ``wrap`` prefixes the command line (the cell's confinement launcher); such a run, or one
    with ``inherit_env=False`` (it starts a program in a cell), gets a minimal environment.
    ``pass_fds``: descriptors git inherits (an ssh key in memory). ``timeout`` (seconds):
    past it git and every process it started are killed and GitTimeout is raised. ``track``:
    the running process is in this set meanwhile (so its owner can kill it: ``kill_tree``).
    ``stdin``: bytes fed to git (else it reads nothing)."""
    inherit = inherit_env and not wrap
    base = os.environ if inherit else {k: os.environ[k] for k in _CELL_PASSTHROUGH if k in os.environ}
    full_env = {**git_env(base, home=not wrap), **(env or {})}
    argv = [*wrap, *git_command(*args)]
    with subprocess.Popen(argv, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=tuple(pass_fds)) as proc:
        if track is not None:
            track.add(proc)
        try:
            out, err = proc.communicate(input=stdin, timeout=None if timeout is None else max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            raise GitTimeout(list(args), timeout or 0.0) from None
        except BaseException:  # e.g. KeyboardInterrupt: leave nothing running
            kill_tree(proc)
            raise
        finally:
            if track is not None:
                track.discard(proc)
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if check and proc.returncode != 0:
        raise GitError(list(args), proc.returncode, stderr)
    return stdout.strip() if strip else stdout


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and its descendants (a filter or hook it started), then reap it. The
    pipes are not drained: a descendant that escaped could hold them open forever."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    proc.kill()
    for child in family:
        with contextlib.suppress(psutil.Error):
            child.kill()
    proc.wait()


def git_ok(cwd: Path | str, *args: str) -> bool:
    """True when the git command exits 0 (for questions such as 'does this ref exist')."""
    proc = subprocess.run(git_command(*args), cwd=cwd, env=git_env(), stdin=subprocess.DEVNULL, capture_output=True)
    return proc.returncode == 0


def git_status(cwd: Path | str, *args: str) -> subprocess.CompletedProcess:
    """Run git and return the finished process, for commands whose exit status is an answer
    rather than a failure (`merge-tree`: 1 = conflicts)."""
    return subprocess.run(git_command(*args), cwd=cwd, env=git_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)


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
                env: dict[str, str] | None = None, check: bool = True, strip: bool = True,
                track: set[subprocess.Popen] | None = None) -> str:
    """Run git in a cell's checkout through the cell launcher: confined by ``policy`` (None:
    unconfined, still reaped), killed with everything it started after ``deadline`` seconds
    (GitTimeout, which names the step). ``track``: the launcher is in this set while it runs
    (it has a session of its own, so Ctrl-C does not reach it: its owner kills it)."""
    deadline = DEFAULT_CELL_GIT_DEADLINE if deadline is None else deadline
    launch = launcher.prepare(git_command(*args), cell_git_env(env), policy, deadline=deadline, term_grace=0.0)
    try:
        proc = subprocess.Popen(launch.argv, cwd=cwd, env=launch.env, pass_fds=launch.pass_fds,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    finally:
        launch.close()
    if track is not None:
        track.add(proc)
    try:
        out, err = proc.communicate(timeout=max(deadline, 0.0) + _LAUNCHER_SLACK)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise GitTimeout(list(args), deadline, err) from None
    except BaseException:  # e.g. KeyboardInterrupt: leave nothing running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        if track is not None:
            track.discard(proc)
    if proc.returncode == launcher.EXIT_DEADLINE and "reactor-confine: deadline" in err:
        raise GitTimeout(list(args), deadline, err)
    if check and proc.returncode != 0:
        raise GitError(list(args), proc.returncode, err)
    return out.strip() if strip else out
