"""Cell bootstrap/teardown benchmark against a bare `opencode serve`, in the same run.

Prints, for N cells (sequential, so the figures are not CPU contention; confined cells,
unconfined cells and bare servers interleaved, so drift in machine load hits all alike):
  - bootstrap broken down: port, checkout, spawn-to-healthy, session; teardown;
  - confined / unconfined bootstrap (Landlock launcher cost) and full task wall time;
  - idle memory per cell (RSS of the server's process group);
  - the same spawn-to-healthy and memory for a bare `opencode serve` started by hand;
  - teardown p50/p99 over the tasks (they use bash), and stops that needed SIGKILL;
  - leaks over the sequential full tasks (scripted model): processes and file descriptors.

Goals: cell bootstrap within 10 % of the bare server's start, confined within 5 % of
unconfined, teardown p99 <= 0.5 s, no growth in processes or descriptors.

    python bench/cell_bootstrap.py [--cells 5] [--tasks 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

import logging

from reactor.infra.confinement import ConfinementSettings
from reactor.infra.processes import find_marked_processes
from reactor.infra.servers import LISTENING_LINE, find_opencode_binary
from reactor_dev.testing.operator_process import free_port
from reactor_dev.testing.repos import make_repo
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, bash, edit, text
from reactor.workflow.cell import Cell
from reactor.workflow.engine import Engine, EngineSettings
from reactor.workflow.tcr import run_task
from reactor.workflow.types import TaskSpec

STALLS = {"bare": 0}  # stops that SIGTERM did not finish within the grace (counted, never fatal)


class _StopCounter(logging.Handler):
    """Counts cell stops that needed SIGKILL (OpenCodeServer.stop logs them)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "after SIGTERM" in record.getMessage():
            self.count += 1


def group_rss(pid: int) -> int:
    total = 0
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pid:
                total += proc.memory_info().rss
        except (psutil.Error, OSError):
            continue
    return total


def bare_server(repo: Path, config: dict, state: Path) -> tuple[float, float, int]:
    """`opencode serve` started by hand, as a user would: spawn-to-healthy, then its first
    session (a user needs one too), and idle RSS after that."""
    password = secrets.token_urlsafe(16)
    env = {**os.environ, "OPENCODE_CONFIG_CONTENT": json.dumps(config), "OPENCODE_SERVER_PASSWORD": password,
           "XDG_DATA_HOME": str(state / "data"), "XDG_STATE_HOME": str(state / "state"),
           "XDG_CONFIG_HOME": str(state / "config"), "XDG_CACHE_HOME": str(state / "cache")}
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen([find_opencode_binary(), "serve", "--port", str(port), "--hostname", "127.0.0.1"],
                            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if LISTENING_LINE.encode() in line:
                break
        while httpx.get(f"http://127.0.0.1:{port}/global/health", auth=("opencode", password)).status_code != 200:
            pass
        ready = time.perf_counter() - started
        session_started = time.perf_counter()
        created = httpx.post(f"http://127.0.0.1:{port}/session", json={"title": "bare"},
                             auth=("opencode", password), timeout=30)
        assert created.status_code == 200, created.text
        session = time.perf_counter() - session_started
        time.sleep(1.0)  # idle memory: let start-up allocations settle (measurement, not synchronisation)
        return ready, session, group_rss(proc.pid)
    finally:
        # A bare server in its first seconds may ignore SIGTERM (npm unpacking its plugin
        # package): count it, kill it, never leave it running.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(0.5)
        except subprocess.TimeoutExpired:
            STALLS["bare"] += 1
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def cell_once(engine: Engine, repo: Path, config: dict, index: int) -> dict[str, float]:
    """One cell through the engine's own boot path (checkout, confinement, server, session)."""
    spec = TaskSpec(task_id=f"BENCH-{index}", prompt="bench", repo=repo, test_command="true", opencode_config=config)
    cell = Cell(spec, engine, cell_id=f"{spec.task_id}-{'c' if engine.confinement.enabled else 'u'}")
    t0 = time.perf_counter()
    cell.port = engine.ports.allocate(cell.cell_id)
    t1 = time.perf_counter()
    await cell.create_worktree()
    t2 = time.perf_counter()
    try:
        await cell.start_server()  # spawn (through the Landlock launcher when confined) + session
        t3 = time.perf_counter()
        await asyncio.sleep(1.0)  # idle memory, as for the bare server (measurement, not synchronisation)
        rss = group_rss(cell.server.pid)
    finally:
        t4 = time.perf_counter()
        await cell.teardown(keep_branch=False)
        t5 = time.perf_counter()
    return {"port": t1 - t0, "checkout": t2 - t1, "start_and_session": t3 - t2, "bootstrap": t3 - t0,
            "teardown": t5 - t4, "rss": rss}


async def tasks_run(engine: Engine, repo: Path, model: ScriptedModel, tag: str, count: int) -> list:
    """Full tasks that use bash, then edit: wall time and TearingDown per task."""
    results = []
    for i in range(count):
        task_id = f"{tag}-{i}"
        model.script.add(Scenario(f"{task_id}:", [bash("ls -la && git status --short"), edit("calc.py", "return a - b", "return a + b"),
                                                  text("ok")]))
        spec = TaskSpec(task_id=task_id, prompt=f"{task_id}: fix add", repo=repo, test_command="python3 -m pytest -q",
                        opencode_config=model.opencode_config())
        result = await run_task(spec, engine)
        assert result.succeeded, result.message
        results.append(result)
    return results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def main_async(cells: int, tasks: int) -> None:
    stops = _StopCounter()
    logging.getLogger("reactor.infra.servers").addHandler(stops)
    logging.getLogger("reactor.infra.servers").setLevel(logging.DEBUG)
    with tempfile.TemporaryDirectory(prefix="reactor-bench-") as tmp_text:
        tmp = Path(tmp_text)
        repo = make_repo(tmp / "repo")
        confined = Engine(EngineSettings(work_dir=tmp / "work-confined", health_timeout=60))
        unconfined = Engine(EngineSettings(work_dir=tmp / "work-unconfined", health_timeout=60,
                                           confinement=ConfinementSettings(required=False, enabled=False)))
        print(confined.confinement.status.message)
        with ScriptedModel([]) as model:
            config = model.opencode_config()
            # Warm the page cache once, for every side alike.
            await asyncio.to_thread(bare_server, repo, config, tmp / "warm")
            bare, runs = [], {"confined": [], "unconfined": []}
            for i in range(cells):
                bare.append(await asyncio.to_thread(bare_server, repo, config, tmp / f"bare-{i}"))
                runs["confined"].append(await cell_once(confined, repo, config, i))
                runs["unconfined"].append(await cell_once(unconfined, repo, config, i))

            med = lambda xs: statistics.median(xs)  # noqa: E731
            bare_ready, bare_session, bare_rss = (med([b[i] for b in bare]) for i in range(3))
            print(f"\nCell bootstrap (median of {cells}, sequential, interleaved)")
            print(f"{'step':<22}{'confined':>10}{'unconfined':>12}")
            for key in ("port", "checkout", "start_and_session", "bootstrap", "teardown"):
                print(f"{key:<22}{med([c[key] for c in runs['confined']]):>10.3f}"
                      f"{med([c[key] for c in runs['unconfined']]):>12.3f}")
            print(f"{'bare start + session':<22}{bare_ready + bare_session:>10.3f}")
            boot_c = med([c["bootstrap"] for c in runs["confined"]])
            boot_u = med([c["bootstrap"] for c in runs["unconfined"]])
            print(f"\nbootstrap confined / unconfined              = {boot_c / boot_u:.3f}  (goal <= 1.05)")
            print(f"bootstrap confined / bare (start + session)  = {boot_c / (bare_ready + bare_session):.3f}  (goal <= 1.10)")
            cell_rss = med([c["rss"] for c in runs["confined"]])
            print(f"idle RSS per cell (with its session) = {cell_rss / 2**20:.0f} MiB; bare server {bare_rss / 2**20:.0f} MiB "
                  f"(ratio {cell_rss / bare_rss:.3f})")

            me = psutil.Process()
            fds0, children0 = me.num_fds(), len(me.children(recursive=True))
            half = max(1, tasks // 2)
            done = {"confined": [], "unconfined": []}
            for start in range(0, half, 5):  # interleaved blocks of 5
                n = min(5, half - start)
                done["confined"] += await tasks_run(confined, repo, model, f"TC{start}", n)
                done["unconfined"] += await tasks_run(unconfined, repo, model, f"TU{start}", n)
            fds1, children1 = me.num_fds(), len(me.children(recursive=True))

        wall_c = med([r.duration for r in done["confined"]])
        wall_u = med([r.duration for r in done["unconfined"]])
        print(f"\nfull task (bash + edit + pytest), median of {half}: confined {wall_c:.2f}s, unconfined {wall_u:.2f}s, "
              f"ratio {wall_c / wall_u:.3f}")
        teardowns = [r.phase_durations.get("TearingDown", 0.0) for side in done.values() for r in side]
        print(f"TearingDown over {len(teardowns)} tasks: p50 {percentile(teardowns, 0.5):.3f}s, "
              f"p99 {percentile(teardowns, 0.99):.3f}s, max {max(teardowns):.3f}s (goal p99 <= 0.5 s)")
        print(f"stops that needed SIGKILL after the {confined.settings.stop_grace:g}s grace: cells {stops.count}, "
              f"bare servers {STALLS['bare']} (counted, not fatal)")
        left = len(find_marked_processes(str(confined.work_dir))) + len(find_marked_processes(str(unconfined.work_dir)))
        print(f"{len(teardowns)} tasks: fds {fds0} -> {fds1}, child processes {children0} -> {children1}, "
              f"marked servers left {left}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main_async(args.cells, args.tasks))


if __name__ == "__main__":
    sys.exit(main())
