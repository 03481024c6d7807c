"""Process ownership and orphan finding.

Every server Reactor starts, and the cell launcher it runs under, carries marker variables
in its environment (never in argv, which other users can read): which cell it serves, which
Reactor process started it, and under which work dir. The launcher ends its cell's
processes itself (it is their subreaper); the markers are the fallback. After a crash, a later run finds orphans by these markers with psutil
and kills their process groups. A process without the markers is never touched.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import psutil

MARK_CELL = "REACTOR_CELL"
MARK_OWNER = "REACTOR_OWNER"
MARK_WORK_DIR = "REACTOR_WORK_DIR"


@dataclass(frozen=True)
class Owner:
    """A process identity that survives PID reuse: the PID plus its start time."""

    pid: int
    started: float

    @classmethod
    def current(cls) -> Owner:
        return cls(os.getpid(), psutil.Process().create_time())

    @property
    def token(self) -> str:
        return f"{self.pid}:{self.started:.2f}"

    @classmethod
    def from_token(cls, token: str) -> Owner:
        pid, started = token.split(":", 1)
        return cls(int(pid), float(started))

    @staticmethod
    def is_alive_token(token: str) -> bool:
        try:
            pid_text, started_text = token.split(":", 1)
            process = psutil.Process(int(pid_text))
            return f"{process.create_time():.2f}" == started_text and process.status() != psutil.STATUS_ZOMBIE
        except (ValueError, psutil.Error):
            return False


@dataclass(frozen=True)
class MarkedProcess:
    pid: int
    cell: str
    owner: str
    work_dir: str
    command: tuple[str, ...] = ()

    @property
    def owner_alive(self) -> bool:
        return Owner.is_alive_token(self.owner)

    @property
    def is_server(self) -> bool:
        """The `opencode serve` process itself (not a shell the agent or a test started)."""
        return len(self.command) >= 2 and os.path.basename(self.command[0]).startswith("opencode") \
            and "serve" in self.command[1:3]


def marker_env(cell: str, owner: Owner, work_dir: str) -> dict[str, str]:
    return {MARK_CELL: cell, MARK_OWNER: owner.token, MARK_WORK_DIR: work_dir}


def find_marked_processes(work_dir: str | None = None, cell: str | None = None) -> list[MarkedProcess]:
    """Process-group leaders carrying Reactor's markers (optionally of one work dir or cell).

    Members of a group are ended with their leader. Leaders include, besides servers, the
    shells that OpenCode's bash tool and /shell endpoint start in sessions of their own:
    they inherit the server's environment, markers included, and escape its group."""
    found = []
    for process in psutil.process_iter(["pid"]):
        try:
            env = process.environ()
            if MARK_CELL not in env or os.getpgid(process.pid) != process.pid:
                continue
            command = tuple(process.cmdline())
        except (psutil.Error, OSError):
            continue
        if work_dir is not None and env.get(MARK_WORK_DIR) != work_dir:
            continue
        if cell is not None and env.get(MARK_CELL) != cell:
            continue
        found.append(MarkedProcess(process.pid, env[MARK_CELL], env.get(MARK_OWNER, ""),
                                   env.get(MARK_WORK_DIR, ""), command))
    return found


def is_marked_for(pid: int, cell: str) -> bool:
    """True when ``pid`` is alive and is the server of ``cell`` (a recorded PID may have been reused)."""
    try:
        return psutil.Process(pid).environ().get(MARK_CELL) == cell
    except psutil.Error:
        return False


def kill_process_group(pgid: int, grace: float = 5.0) -> None:
    """SIGTERM the group, then SIGKILL what is left after ``grace`` seconds. Blocking."""
    members = _group_members(pgid)
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    # Poll the members found once (rescanning every process on the machine each time would
    # be costly); anything that joined the group meanwhile gets the SIGKILL below.
    deadline = time.monotonic() + grace
    while any(_running(p) for p in members) and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _running(process: psutil.Process) -> bool:
    """Zombies (exited, not yet reaped by their parent) count as gone."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(process.pid) == pgid:
                members.append(process)
        except (OSError, psutil.Error):
            continue
    return members
