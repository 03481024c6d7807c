"""The engine: what all cells of one Reactor process share (ports, worktrees, settings,
the max-agents bound). The CLI makes one; the operator makes one."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import reactor
from reactor.infra.cellrecords import CellRecords
from reactor.infra.confinement import Confinement, ConfinementSettings
from reactor.infra.ports import DEFAULT_PORT_RANGE, PortAllocator, PortRange
from reactor.infra.private import OperatorFiles
from reactor.infra.processes import Owner
from reactor.infra.servers import find_opencode_binary
from reactor.infra.worktrees import WorktreeManager
from reactor.infra.memory import CgroupMemory, SimulatedMemory, cell_memory, replica_memory
from reactor.workflow.capacity import CapacityGate, MemoryAdmission
from reactor.workflow.recovery import RecoveryPolicy

log = logging.getLogger(__name__)
MiB = 1 << 20


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
    # A finished install of OpenCode's plugin package (`make opencode` builds one into .tools/,
    # the image into /opt): every cell's config dir links to it, read-only. Without it each
    # cell installs its own copy from the npm registry on its first session.
    opencode_seed: Path | None = field(default_factory=lambda: _env_path("REACTOR_OPENCODE_SEED"))
    max_agents: int = 50
    # Servers starting at once. A start is ~1.2 s of CPU: ten at once on 2 cores all miss
    # the health timeout, and BOOT_RETRY would restart them all at once again.
    max_starting: int = field(default_factory=lambda: os.cpu_count() or 2)
    # A cold start is ~2 s on an idle machine but 12-15 s on a busy 2-core one (measured):
    # a slow start is not a failed one, and BOOT_RETRY has only 2 restarts per task.
    # $REACTOR_HEALTH_TIMEOUT changes the default (the test suite raises it).
    health_timeout: float = field(default_factory=lambda: float(os.environ.get("REACTOR_HEALTH_TIMEOUT", "30")))
    # OpenCode has no graceful shutdown to wait for (it dies by SIGTERM's default action, or
    # ignores it while npm unpacks): a short grace, then SIGKILL.
    stop_grace: float = 0.2
    # Each of Reactor's git steps in a cell's checkout (status, add, commit, reset, clean,
    # upload-pack) is killed, with everything it started, after this many seconds.
    git_step_timeout: float = 60.0
    # No progress (no new message part, tool call or token) for this long ends a turn with
    # AgentStalled, instead of a stuck agent burning CPU until the time box.
    stall_timeout: float = 300.0
    # The CLI hands its own environment to servers (the user's API keys); the operator does not.
    inherit_env: bool = True
    # Added to every server's environment (below the task's own variables). None by default:
    # capping JavaScriptCore's heap (BUN_JSC_forceRAMSize=256 MiB) saved 15% of a cell's
    # memory but kept its collector busy, 15% of a core per idle cell against 1% without
    # (bench/cell_memory.py): on a node CPU runs out long before memory does.
    server_env: dict[str, str] = field(default_factory=dict)
    # Memory-aware admission: a cell starts only while the memory limit minus the working set
    # covers a cell's peak. memory_limit None = the cgroup's limit (none: --max-agents alone);
    # a number simulates a smaller limit. cell_memory = a cell's peak until a larger is measured.
    memory_admission: bool = True
    memory_limit: int | None = None
    cell_memory: int = 600 * MiB
    recovery: RecoveryPolicy = field(default_factory=RecoveryPolicy)
    # Committing (and reverting) get this long from their start, whether the time box has
    # time left or has just run out: a tested change is not lost for the box ending
    # meanwhile, and a commit a planted filter hangs holds the task no longer (docs/faults.md).
    commit_grace: float = 60.0
    # reactor operator --cells-outlive-operator: a cell is not ended by its operator's death
    # (only by its time box), so the next operator can reattach to it (docs/architecture.md).
    cells_outlive_operator: bool = False
    confinement: ConfinementSettings = field(default_factory=ConfinementSettings)
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
        self.seed_dir = _usable_seed(self.settings.opencode_seed)
        # What the engine keeps for itself (servers' logs), where no cell reaches.
        self.files = OperatorFiles(self.work_dir).prepare()
        self.records = CellRecords(self.files.root)  # the cells that may outlive this process
        # Raises ConfinementUnavailable when cells cannot be confined and that was not allowed.
        self.confinement = Confinement(self.settings.confinement, self.work_dir,
                                       shared_read=[p for p in (_install_root(self.opencode_bin),
                                                                Path(reactor.__file__).parent, self.seed_dir) if p],
                                       cell_ports=range(self.settings.port_range.start, self.settings.port_range.end))
        self.owner = Owner.current()
        self.ports = PortAllocator(self.settings.port_range)
        self.worktrees = WorktreeManager(self.work_dir / "worktrees", self.owner)
        # Bounds cells alive at once (--max-agents, and memory); waiters start in priority order.
        self.capacity = CapacityGate(self.settings.max_agents, self._memory_admission())
        self.starting = asyncio.Semaphore(self.settings.max_starting)

    def _memory_admission(self) -> MemoryAdmission | None:
        settings = self.settings
        if not settings.memory_admission:
            return None
        work_dir, owner = str(self.work_dir), self.owner.token
        if settings.memory_limit is not None:
            gauge = SimulatedMemory(settings.memory_limit, lambda: replica_memory(work_dir, owner))
        else:
            gauge = CgroupMemory.detect()
            if gauge is None:
                return None
        return MemoryAdmission(gauge.read, lambda: cell_memory(work_dir, owner), settings.cell_memory)

    @property
    def work_dir(self) -> Path:
        return self.settings.work_dir

    @property
    def cells_dir(self) -> Path:
        return self.work_dir / "cells"



def _install_root(binary: str) -> Path:
    """What a cell must be able to read to run opencode: the npm package tree it comes from
    (its launcher script execs a platform package's binary), or the binary's directory."""
    real = Path(os.path.realpath(binary))
    for parent in real.parents:
        if parent.name == "node_modules":
            return parent
    return real.parent


def _usable_seed(seed: Path | None) -> Path | None:
    if seed is None:
        return None
    seed = Path(seed).expanduser().resolve()
    if all((seed / name).exists() for name in ("package.json", "package-lock.json", "node_modules")):
        return seed
    log.warning("REACTOR_OPENCODE_SEED=%s is not a finished install (package.json, package-lock.json, "
                "node_modules); cells will install OpenCode's plugin package themselves", seed)
    return None
