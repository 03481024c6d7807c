"""`reactor run` with observation: live activity lines on stderr, a transcript per task
under ``<work-dir>/transcripts/local/``, and (``--web``) the fleet page and ``/metrics``."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TextIO

from reactor.opencode.events import Event
from reactor.observe.observation import LOCAL_NAMESPACE, Observatory
from reactor.observe.progress import Milestone
from reactor.observe.transcript import printable
from reactor.observe.web import WebServer, parse_address
from reactor.workflow.control import TaskControl
from reactor.workflow.engine import Engine
from reactor.workflow.tcr import run_task
from reactor.workflow.types import PhaseEvent, TaskResult, TaskSpec


def observatory_for(engine: Engine) -> Observatory:
    gate = engine.capacity
    return Observatory(engine.work_dir / "transcripts", capacity=lambda: (gate.in_use, gate.limit, gate.waiting))


async def run_observed(specs: Sequence[TaskSpec], engine: Engine,
                       report: Callable[[PhaseEvent], Awaitable[None]] | None = None,
                       web: str | None = None, out: TextIO = sys.stderr,
                       observatory: Observatory | None = None) -> list[TaskResult]:
    observatory = observatory or observatory_for(engine)
    server = None
    if web:
        host, port = parse_address(web)
        server = WebServer(observatory, host, port)
        await server.start()
        print(f"Fleet page: http://{host}:{server.port}/  (metrics: /metrics)", file=out, flush=True)
    try:
        return list(await asyncio.gather(*(_run_one(spec, engine, observatory, report, out) for spec in specs)))
    finally:
        if server is not None:
            await server.stop()


async def _run_one(spec: TaskSpec, engine: Engine, observatory: Observatory,
                   report: Callable[[PhaseEvent], Awaitable[None]] | None, out: TextIO) -> TaskResult:
    control = TaskControl()

    def milestone(m: Milestone) -> None:
        print(printable(f"[{spec.task_id}] {m.reason}: {m.message}"), file=out, flush=True)

    observation = observatory.observe(LOCAL_NAMESPACE, spec.task_id, control, list(spec.env.values()), milestone)
    shown = [""]

    def watch(event: Event) -> None:
        observation.on_event(event)
        activity = observation.progress.activity
        if activity and activity != shown[0] and activity not in ("thinking", "prompting the agent"):
            shown[0] = activity
            print(printable(f"[{spec.task_id}]   {activity}  ({control.spend.describe()})"), file=out, flush=True)

    async def on_phase(event: PhaseEvent) -> None:
        observation.on_phase(event)
        if report is not None:
            await report(event)

    result = await run_task(spec, engine, on_phase, control=control, watchers=[watch])
    observation.finish(result)
    print(f"[{spec.task_id}] transcript: {observation.transcript.path}", file=out, flush=True)
    return result
