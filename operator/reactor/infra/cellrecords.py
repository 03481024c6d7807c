"""The operator's record of each cell that may outlive it, and the check that a recorded
cell is still the one it started (``reactor operator --cells-outlive-operator``).

A cell whose launcher runs without the parent-death signal keeps running when its operator
dies, until its deadline (the task's time box). The next operator reattaches to it only if
it can prove the process is the launcher it recorded. Everything needed for that lives in
``<work-dir>/operator/cells/<cell>.json`` (0600, in the 0700 private dir no cell can read or
write), written and read through ``safefs`` (no link followed); nothing a cell wrote is
consulted:

- the launcher's pid **and** its start time (``/proc/PID/stat`` field 22, clock ticks since
  boot, written by the kernel): a pid the kernel has reused has another start time. The
  check runs on a pidfd opened first, so the process checked is the process kept: every
  later signal goes through that pidfd, never a pid number;
- the launcher's command line (our launcher script, ``opencode serve`` on the recorded port)
  and its marker variables (cell, owner token, work dir): the launcher's own environment is
  fixed by the operator and a cell cannot change another process's;
- the server's port and password (Reactor's own credential for that server, never a
  tenant's secret; a cell cannot read it), so the server can be asked whether it answers;
- the agent's session id, the launcher's deadline, the token its "swept" line carries, and
  a digest of the confinement it was started with (a cell is reattached only by an operator
  that would confine it the same way: one restarted with stricter flags reopens it instead).

The task's own secrets are not recorded: the running server already has them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from reactor.infra import launcher, safefs
from reactor.infra.processes import MARK_CELL, MARK_OWNER, MARK_WORK_DIR

log = logging.getLogger(__name__)

RECORD_LIMIT = 64 << 10  # bytes: a record is a few hundred


@dataclass(frozen=True)
class CellRecord:
    cell_id: str
    launcher_pid: int
    launcher_start: int  # clock ticks since boot, from the kernel (/proc/PID/stat field 22)
    port: int
    password: str  # the server's; Reactor's own credential, never a tenant secret
    session_id: str
    owner: str  # the Owner token in the cell's markers (the operator that started it)
    deadline_at: float  # epoch seconds: the launcher ends the cell then, operator or not
    sweep_token: str = ""  # what its launcher's "swept" line carries ("": a record from before it did)
    # The confinement it was started with (confinement.policy_fingerprint): reattached only
    # by an operator that would confine it the same way ("": a record from before, never).
    policy: str = ""


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None: no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # The command name (field 2) may hold spaces and parentheses: fields after its last ")".
            return int(stat.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


class CellRecords:
    """``<work-dir>/operator/cells/``: one record per cell that may outlive its operator."""

    def __init__(self, operator_dir: Path):
        self.dir = Path(operator_dir) / "cells"

    @staticmethod
    def _name(cell_id: str) -> str:
        from reactor.infra.worktrees import safe_component  # worktrees -> git -> private

        return f"{safe_component(cell_id)}.json"

    def write(self, record: CellRecord) -> None:
        safefs.private_dir(self.dir)
        safefs.replace_file(self.dir, self._name(record.cell_id), json.dumps(asdict(record)).encode(), 0o600)

    def read(self, cell_id: str) -> CellRecord | None:
        if not self.dir.is_dir():
            return None
        data = safefs.read_regular(self.dir, self._name(cell_id), RECORD_LIMIT)
        if data is None:
            return None
        try:
            record = CellRecord(**json.loads(data))
        except (ValueError, TypeError) as exc:
            log.warning("cell %s: unreadable record, not reattached: %s", cell_id, exc)
            return None
        return record if record.cell_id == cell_id else None

    def remove(self, cell_id: str) -> None:
        try:
            os.unlink(self.dir / self._name(cell_id))
        except FileNotFoundError:
            pass

    def remove_stale(self, keep: frozenset[str]) -> list[str]:
        """Remove the records of cells not in ``keep`` whose operator is gone (a live
        operator sharing the work dir keeps its own); returns their cell ids."""
        from reactor.infra.processes import Owner

        removed = []
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            data = safefs.read_regular(self.dir, path.name, RECORD_LIMIT)
            try:
                record = CellRecord(**json.loads(data or b""))
            except (ValueError, TypeError):
                record = None
            if record is not None and (record.cell_id in keep or Owner.is_alive_token(record.owner)):
                continue
            path.unlink(missing_ok=True)
            removed.append(record.cell_id if record is not None else path.stem)
        return removed


@dataclass
class LiveCell:
    """A recorded cell whose launcher was proven to be the one recorded, held by a pidfd."""

    record: CellRecord
    pidfd: int
    taken: bool = False  # a run took it over (else whoever verified it must stop it)

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def verify(record: CellRecord, work_dir: Path) -> LiveCell | None:
    """The recorded launcher, if it still runs and is provably the one recorded (see the
    module doc); None otherwise. The pidfd is opened before the checks, so a pid reused
    meanwhile fails them instead of being kept."""
    try:
        pidfd = os.pidfd_open(record.launcher_pid)
    except OSError:
        return None
    why = _mismatch(record, Path(work_dir))
    if why is not None:
        log.warning("cell %s: recorded launcher pid %s not reattached: %s", record.cell_id, record.launcher_pid, why)
        os.close(pidfd)
        return None
    return LiveCell(record, pidfd)


def _mismatch(record: CellRecord, work_dir: Path) -> str | None:
    pid = record.launcher_pid
    if start_ticks(pid) != record.launcher_start:
        return "another process (its start time differs)"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            argv = [a.decode(errors="replace") for a in cmdline.read().split(b"\0")[:-1]]
        with open(f"/proc/{pid}/environ", "rb") as environ:
            items = environ.read().split(b"\0")
        env = dict(item.decode(errors="replace").partition("=")[::2] for item in items if item)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    # python -I -S LAUNCHER --config-fd N -- OPENCODE serve --port PORT ...
    if len(argv) < 11 or argv[3] != str(launcher.LAUNCHER) or argv[6] != "--" \
            or argv[8:11] != ["serve", "--port", str(record.port)]:
        return "not the cell launcher of an opencode server on the recorded port"
    markers = (env.get(MARK_CELL), env.get(MARK_OWNER), env.get(MARK_WORK_DIR))
    if markers != (record.cell_id, record.owner, str(work_dir)):
        return "its markers name another cell, owner or work dir"
    return None
