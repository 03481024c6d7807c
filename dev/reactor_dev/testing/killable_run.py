"""One task run in a process of its own, to be killed like an operator (SIGKILL, no
teardown): ``python -m reactor_dev.testing.killable_run SPEC.json WORK_DIR CELL_ID EVENTS``.

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

from reactor.infra.processes import find_marked_processes
from reactor.workflow.engine import Engine, EngineSettings
from reactor.workflow.tcr import run_task
from reactor.workflow.types import PhaseEvent, TaskSpec
from reactor_dev.testing.workers import ports

PORTS = ports(18000, 18500)  # runs as a script: the worker's name comes in its environment


class KillableRun:
    def __init__(self, spec: TaskSpec, work_dir: Path, cell_id: str):
        self.spec, self.work_dir, self.cell_id = spec, Path(work_dir), cell_id
        self.events_path = self.work_dir / f"{cell_id}.events.jsonl"
        self.process: subprocess.Popen | None = None

    def start(self) -> KillableRun:
        spec_path = self.work_dir / f"{self.cell_id}.spec.json"
        spec_path.write_text(self.spec.model_dump_json())
        with open(self.work_dir / f"{self.cell_id}.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "reactor_dev.testing.killable_run", str(spec_path), str(self.work_dir),
                 self.cell_id, str(self.events_path)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def events(self) -> list[PhaseEvent]:
        if not self.events_path.exists():
            return []
        return [PhaseEvent.model_validate_json(line) for line in self.events_path.read_text().splitlines() if line]

    def session_id(self) -> str | None:
        return next((e.cell.session_id for e in reversed(self.events()) if e.cell.session_id), None)

    def kill(self) -> None:
        """SIGKILL the run and every process of its cell: nothing is torn down."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        for proc in find_marked_processes(str(self.work_dir.resolve()), self.cell_id):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


async def _main(spec_path: str, work_dir: str, cell_id: str, events: str) -> None:
    spec = TaskSpec.model_validate_json(Path(spec_path).read_text())
    engine = Engine(EngineSettings(work_dir=Path(work_dir), port_range=PORTS, health_timeout=60.0))

    async def report(event: PhaseEvent) -> None:
        with open(events, "a") as out:
            out.write(event.model_dump_json() + "\n")

    await run_task(spec, engine, report, cell_id=cell_id)


if __name__ == "__main__":
    asyncio.run(_main(*sys.argv[1:5]))
