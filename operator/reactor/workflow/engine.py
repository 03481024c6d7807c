"""The engine: what all cells of one Reactor process share (ports, worktrees, settings,
the max-agents bound). The CLI makes one; the operator makes one."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path

from reactor.infra.ports import DEFAULT_PORT_RANGE, PortAllocator, PortRange
from reactor.infra.processes import Owner
from reactor.infra.servers import find_opencode_binary
from reactor.infra.worktrees import WorktreeManager
from reactor.workflow.capacity import CapacityGate
from reactor.workflow.recovery import RecoveryPolicy


CELL_PERMISSIONS = {
    "read": "allow", "edit": "allow", "glob": "allow", "grep": "allow", "list": "allow", "bash": "allow",
    "task": "allow", "todowrite": "allow", "lsp": "allow", "skill": "allow", "webfetch": "allow",
    "websearch": "allow",
    "external_directory": "deny",  # outside the worktree (a check on the command text, not a sandbox)
    "question": "deny",  # asks the user, and there is none
    "doom_loop": "deny",  # the same call repeated: refuse it, the agent sees why
}


def default_work_dir() -> Path:
    """$REACTOR_WORK_DIR, else $XDG_STATE_HOME/reactor (~/.local/state/reactor)."""
    explicit = os.environ.get("REACTOR_WORK_DIR")
    if explicit:
        return Path(explicit).expanduser().resolve()
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return (Path(state) / "reactor").resolve()


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else None


@dataclass
class EngineSettings:
    work_dir: Path = field(default_factory=default_work_dir)
    port_range: PortRange = PortRange(*DEFAULT_PORT_RANGE)
    opencode_bin: str | None = None
    # OpenCode's download cache (npm packages it installs on first start), shared by cells.
    cache_dir: Path | None = field(default_factory=lambda: _env_path("REACTOR_OPENCODE_CACHE"))
    max_agents: int = 50
    # Servers starting at once. A start is ~1.2 s of CPU: ten at once on 2 cores all miss
    # the health timeout, and BOOT_RETRY would restart them all at once again.
    max_starting: int = field(default_factory=lambda: os.cpu_count() or 2)
    # A cold start is ~2 s on an idle machine but 12-15 s on a busy 2-core one (measured):
    # a slow start is not a failed one, and BOOT_RETRY has only 2 restarts per task.
    health_timeout: float = 30.0
    stop_grace: float = 5.0
    # No progress (no new message part, tool call or token) for this long ends a turn with
    # AgentStalled, instead of a stuck agent burning CPU until the time box.
    stall_timeout: float = 300.0
    # The CLI hands its own environment to servers (the user's API keys); the operator does not.
    inherit_env: bool = True
    recovery: RecoveryPolicy = field(default_factory=RecoveryPolicy)
    # Base OpenCode config for every cell. A headless agent has nobody to answer a
    # permission prompt, so every permission OpenCode 1.18 knows is set here (a key left
    # out defaults to `ask`, e.g. doom_loop: opencode#16367); a prompt that still appears
    # (a task's own config may ask for one) is refused at once (workflow/watch.py).
    base_opencode_config: dict = field(default_factory=lambda: {
        "autoupdate": False,
        "share": "disabled",
        "permission": dict(CELL_PERMISSIONS),
    })


class Engine:
    def __init__(self, settings: EngineSettings | None = None):
        self.settings = settings or EngineSettings()
        self.settings.work_dir = Path(self.settings.work_dir).resolve()
        self.opencode_bin = find_opencode_binary(self.settings.opencode_bin)
        self.owner = Owner.current()
        self.ports = PortAllocator(self.settings.port_range)
        self.worktrees = WorktreeManager(self.work_dir / "worktrees", self.owner)
        # Bounds cells alive at once (--max-agents); waiters start in priority order.
        self.capacity = CapacityGate(self.settings.max_agents)
        self.starting = asyncio.Semaphore(self.settings.max_starting)

    @property
    def work_dir(self) -> Path:
        return self.settings.work_dir

    @property
    def cells_dir(self) -> Path:
        return self.work_dir / "cells"

    @property
    def cache_dir(self) -> Path:
        return Path(self.settings.cache_dir or self.work_dir / "cache")
