"""Resuming a task whose Reactor process was SIGKILLed mid-turn: reattach, reopen, restart.

Engine level (no Kubernetes: the operator's resume adds a status read to the same path):
a task runs in a process of its own (reactor_dev.testing.killable_run), its agent writes a
file, then its next model call is held and the process is SIGKILLed. A new engine then
resumes it as a restarted operator does (``resume_run``):
  - reattach: the cell outlived the process (--cells-outlive-operator) and is reattached to;
  - reopen:   the cell died with it; the session is reopened with one continuation message;
  - restart:  spec.resume restart, i.e. running again from the base: the baseline.

Prints, per mode (median of --rounds), and as ratios against restart measured in the same run:
  - restart to agent busy: from the new engine's start to the agent working again (reattach:
    the run follows the live turn, its Executing phase; reopen and restart: the first model
    call after the restart);
  - model calls and tokens after recovery (the scripted model answers 100 + 20 tokens a call);
  - processes left once the resumed task ended (cells' marked processes; the goal is 0).

    python bench/resume.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from reactor.infra.processes import find_marked_processes
from reactor.workflow.engine import Engine
from reactor.workflow.types import Outcome, Phase, TaskSpec
from reactor_dev.testing.engine import engine_settings
from reactor_dev.testing.killable_run import KillableRun, resume_run
from reactor_dev.testing.repos import make_repo
from reactor_dev.testing.scripted_model import (DEFAULT_USAGE, Scenario, ScriptedModel, edit, hang, set_event, text,
                                                wait_for, write)

MODES = ("reattach", "reopen", "restart")
FIX = edit("calc.py", "return a - b", "return a + b")


async def one(mode: str, round_: int, root: Path) -> dict:
    name = f"R-{mode.upper()}-{round_}"
    repo, work_dir = make_repo(root / f"{name}-repo"), root / f"{name}-work"
    work_dir.mkdir()
    reached, release = threading.Event(), threading.Event()
    # reattach: the held call stays open in the surviving cell and is answered afterwards;
    # otherwise it hangs until its server dies with the process.
    held = wait_for(release) if mode == "reattach" else hang()
    steps = [write("notes.txt", "step one\n"), set_event(reached), held, FIX, text("Fixed.")]
    with ScriptedModel([Scenario(name, steps)]) as model:
        spec = TaskSpec(task_id=name, prompt=f"{name}: fix add() in calc.py", repo=repo,
                        test_command="python3 -m pytest -q", opencode_config=model.opencode_config(), timeout=600)
        killed = KillableRun(spec, work_dir, name, outlive=mode == "reattach").start()
        while not reached.wait(0.05):
            if killed.process.poll() is not None:
                raise RuntimeError(f"{name}: the run ended early: {(work_dir / f'{name}.log').read_text()[-2000:]}")
        session = killed.session_id() if mode != "restart" else None
        killed.kill(cells=mode != "reattach")
        before = len(model.requests)
        executing = asyncio.Event()

        async def report(event):
            if event.phase is Phase.EXECUTING:
                executing.set()

        began = time.monotonic()
        started = time.time()
        engine = Engine(engine_settings(work_dir, cells_outlive_operator=mode == "reattach"))
        run = asyncio.create_task(resume_run(spec, engine, name, session, report))
        await executing.wait()
        executing_after = time.monotonic() - began
        release.set()
        result = await run
        after = [r for r in model.requests[before:] if r.get("scenario") == name]
    if result.outcome is not Outcome.COMMITTED:
        raise RuntimeError(f"{name}: {result.reason.value}: {result.message}")
    busy = executing_after if mode == "reattach" else after[0]["time"] - started
    # Calls made after the restart: a reattached cell's held call was made before the crash
    # (the model logs it when it answers); a reopened or restarted cell makes its calls anew.
    calls = len(after) - 1 if mode == "reattach" else len(after)
    return {"busy": busy, "calls": calls, "tokens": calls * sum(DEFAULT_USAGE), "resumed": result.resumed,
            "left": len(find_marked_processes(str(work_dir.resolve())))}


async def main(rounds: int) -> int:
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="reactor-bench-resume-") as tmp:
        for round_ in range(rounds):  # modes interleaved: drift in the machine's load hits all alike
            for mode in MODES:
                results[mode].append(await one(mode, round_, Path(tmp)))
    base = {key: statistics.median(r[key] for r in results["restart"]) for key in ("busy", "tokens")}
    print(f"{'mode':<10} {'resumed':<11} {'busy s':>7} {'x restart':>9} {'calls':>5} {'tokens':>6} {'x restart':>9} "
          f"{'left':>4}")
    for mode in MODES:
        rows = results[mode]
        busy = statistics.median(r["busy"] for r in rows)
        tokens = statistics.median(r["tokens"] for r in rows)
        print(f"{mode:<10} {rows[0]['resumed'] or '-':<11} {busy:>7.2f} {busy / base['busy']:>9.2f} "
              f"{statistics.median(r['calls'] for r in rows):>5g} {tokens:>6g} {tokens / base['tokens']:>9.2f} "
              f"{max(r['left'] for r in rows):>4}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    sys.exit(asyncio.run(main(parser.parse_args().rounds)))
