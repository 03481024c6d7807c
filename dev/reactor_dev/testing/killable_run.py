"""One task run in a process of its own, to be killed like an operator (SIGKILL, no
teardown): ``python -m reactor_dev.testing.killable_run SPEC.json WORK_DIR CELL_ID EVENTS [outlive] [resume]``
(``outlive``: its cells outlive it, as under ``reactor operator --cells-outlive-operator``;
``resume``: it takes over what the last run recorded in EVENTS, as a restarted operator
does: ``resume_run``).

Its phase events go to EVENTS as JSON lines (the cell's port, pid and session id, as the
operator's status would record them). ``KillableRun`` starts it and kills it together with
its cell's processes (they run in sessions of their own, found by their markers): what a
pod restart leaves is the work dir."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from reactor.infra.cellrecords import verify
from reactor.infra.cleanup import cleanup_leftovers
from reactor.infra.processes import find_marked_processes
from reactor.workflow.engine import Engine, EngineSettings
from reactor.workflow.tcr import run_task
from reactor.workflow.types import PhaseEvent, TaskResult, TaskSpec
from reactor_dev.testing.workers import ports

PORTS = ports(18000, 18500)  # runs as a script: the worker's name comes in its environment


class KillableRun:
    def __init__(self, spec: TaskSpec, work_dir: Path, cell_id: str, outlive: bool = False, resume: bool = False):
        self.spec, self.work_dir, self.cell_id = spec, Path(work_dir), cell_id
        self.options = [name for name, on in (("outlive", outlive), ("resume", resume)) if on]
        self.events_path = self.work_dir / f"{cell_id}.events.jsonl"
        self.process: subprocess.Popen | None = None

    def start(self) -> KillableRun:
        spec_path = self.work_dir / f"{self.cell_id}.spec.json"
        spec_path.write_text(self.spec.model_dump_json())
        with open(self.work_dir / f"{self.cell_id}.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "reactor_dev.testing.killable_run", str(spec_path), str(self.work_dir),
                 self.cell_id, str(self.events_path), *self.options],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def events(self) -> list[PhaseEvent]:
        if not self.events_path.exists():
            return []
        return [PhaseEvent.model_validate_json(line) for line in self.events_path.read_text().splitlines() if line]

    def session_id(self) -> str | None:
        return last_session(self.events_path)

    def kill(self, cells: bool = True) -> None:
        """SIGKILL the run and (``cells``) every process of its cell: nothing is torn down."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        for proc in find_marked_processes(str(self.work_dir.resolve()), self.cell_id) if cells else []:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def last_session(events: Path) -> str | None:
    """The agent's session as the last run's phase events recorded it (a status would)."""
    lines = Path(events).read_text().splitlines() if Path(events).exists() else []
    found = (PhaseEvent.model_validate_json(line).cell.session_id for line in reversed(lines) if line)
    return next((session for session in found if session), None)


async def resume_run(spec: TaskSpec, engine: Engine, cell_id: str, session: str | None, report) -> TaskResult:
    """What a restarted operator does with a task interrupted mid-turn: verify the cell's
    private record (a cell that outlived the run), sweep what is left but that cell and the
    checkout to reopen (``cleanup_leftovers``, the operator's startup sweep), then run the
    task in its session: reattached, reopened, or (no session) from the start."""
    record = engine.records.read(cell_id) if session is not None else None
    live = verify(record, engine.work_dir) if record is not None else None
    keep = frozenset({cell_id}) if session is not None else frozenset()
    cleanup_leftovers(engine.work_dir, None, keep, frozenset({cell_id}) if live is not None else frozenset())
    return await run_task(spec, engine, report, cell_id=cell_id, reopen_session=session, reattach=live)


async def _main(spec_path: str, work_dir: str, cell_id: str, events: str, *options: str) -> None:
    spec = TaskSpec.model_validate_json(Path(spec_path).read_text())
    engine = Engine(EngineSettings(work_dir=Path(work_dir), port_range=PORTS, health_timeout=60.0,
                                   cells_outlive_operator="outlive" in options))
    session = last_session(Path(events)) if "resume" in options else None

    async def report(event: PhaseEvent) -> None:
        with open(events, "a") as out:
            out.write(event.model_dump_json() + "\n")

    await resume_run(spec, engine, cell_id, session, report)


if __name__ == "__main__":
    asyncio.run(_main(*sys.argv[1:]))
