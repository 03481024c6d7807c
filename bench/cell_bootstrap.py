"""Cell bootstrap/teardown benchmark against a bare `opencode serve`, in the same run.

Prints, for N cells (sequential, so the figures are not CPU contention):
  - bootstrap broken down: port, worktree, spawn-to-healthy, session; teardown;
  - idle memory per cell (RSS of the server's process group);
  - the same spawn-to-healthy and memory for a bare `opencode serve` started by hand;
  - leaks over 20 sequential full tasks (scripted model): processes and file descriptors.

Goals: cell bootstrap within 10 % of the bare server's start, teardown < 0.5 s, no growth
in processes or descriptors.

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

from reactor.infra.processes import find_marked_processes
from reactor.infra.servers import LISTENING_LINE, find_opencode_binary
from reactor.testing.operator_process import free_port
from reactor.testing.repos import make_repo
from reactor.testing.scripted_model import Scenario, ScriptedModel, edit, text
from reactor.workflow.cell import Cell
from reactor.workflow.engine import Engine, EngineSettings
from reactor.workflow.tcr import run_task
from reactor.workflow.types import TaskSpec

CACHE = Path(os.environ.get("REACTOR_OPENCODE_CACHE", Path.home() / ".cache" / "reactor-tests" / "opencode"))


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
           "XDG_CONFIG_HOME": str(state / "config"), "XDG_CACHE_HOME": str(CACHE)}
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
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


async def cell_once(engine: Engine, repo: Path, config: dict, index: int) -> dict[str, float]:
    spec = TaskSpec(task_id=f"BENCH-{index}", prompt="bench", repo=repo, test_command="true", opencode_config=config)
    cell = Cell(spec, engine)
    t0 = time.perf_counter()
    cell.port = engine.ports.allocate(cell.cell_id)
    t1 = time.perf_counter()
    await cell.create_worktree()
    t2 = time.perf_counter()
    assert cell.worktree is not None
    from reactor.infra.servers import OpenCodeServer, ServerSpec
    # The same steps as Cell._boot_once, timed separately.
    cell.server = OpenCodeServer(ServerSpec(
        binary=engine.opencode_bin, cwd=cell.worktree.path, port=cell.port, cell_id=cell.cell_id,
        state_dir=cell.state_dir, cache_dir=engine.cache_dir, work_dir=engine.work_dir,
        config=cell.opencode_config(), owner=engine.owner))
    await cell.server.start(timeout=60)
    t3 = time.perf_counter()
    from reactor.opencode.client import OpenCodeClient
    cell.client = OpenCodeClient(cell.server.base_url, cell.server.password)
    cell.session_id = (await cell.client.create_session(title="bench")).id
    t4 = time.perf_counter()
    await asyncio.sleep(1.0)  # idle memory, as for the bare server
    rss = group_rss(cell.server.pid)
    t5 = time.perf_counter()
    await cell.teardown(keep_branch=False)
    t6 = time.perf_counter()
    return {"port": t1 - t0, "worktree": t2 - t1, "spawn_to_healthy": t3 - t2, "session": t4 - t3,
            "bootstrap": (t4 - t0), "teardown": t6 - t5, "rss": rss}


async def leak_check(engine: Engine, repo: Path, tasks: int) -> dict[str, int]:
    me = psutil.Process()
    scenarios = [Scenario(f"LEAK-{i}:", [edit("calc.py", "return a - b", "return a + b"), text("ok")])
                 for i in range(tasks)]
    with ScriptedModel(scenarios) as model:
        config = model.opencode_config()

        async def one(i: int):
            spec = TaskSpec(task_id=f"LEAK-{i}", prompt=f"LEAK-{i}: fix add", repo=repo,
                            test_command="python3 -m pytest -q", opencode_config=config)
            return await run_task(spec, engine)

        first = await one(0)  # warm-up: imports, thread pools, client pools
        fds0, children0 = me.num_fds(), len(me.children(recursive=True))
        outcomes = [first.outcome.value] + [(await one(i)).outcome.value for i in range(1, tasks)]
        fds1, children1 = me.num_fds(), len(me.children(recursive=True))
    return {"tasks": tasks, "committed": outcomes.count("committed"), "fds_before": fds0, "fds_after": fds1,
            "children_before": children0, "children_after": children1,
            "marked_servers_after": len(find_marked_processes(str(engine.work_dir)))}


async def main_async(cells: int, tasks: int) -> None:
    with tempfile.TemporaryDirectory(prefix="reactor-bench-") as tmp_text:
        tmp = Path(tmp_text)
        repo = make_repo(tmp / "repo")
        engine = Engine(EngineSettings(work_dir=tmp / "work", cache_dir=CACHE, health_timeout=60))
        with ScriptedModel([]) as model:
            config = model.opencode_config()
            # Warm the shared download cache and the page cache once, for both sides alike.
            await asyncio.to_thread(bare_server, repo, config, tmp / "warm")
            bare, cell_runs = [], []
            for i in range(cells):  # interleaved, so drift in machine load hits both alike
                bare.append(await asyncio.to_thread(bare_server, repo, config, tmp / f"bare-{i}"))
                cell_runs.append(await cell_once(engine, repo, config, i))

        med = lambda xs: statistics.median(xs)  # noqa: E731
        bare_ready, bare_session, bare_rss = (med([b[i] for b in bare]) for i in range(3))
        print(f"\nCell bootstrap vs bare `opencode serve` (median of {cells}, sequential)")
        print(f"{'step':<22}{'seconds':>10}")
        for key in ("port", "worktree", "spawn_to_healthy", "session", "bootstrap", "teardown"):
            print(f"{key:<22}{med([c[key] for c in cell_runs]):>10.3f}")
        print(f"{'bare spawn_to_healthy':<22}{bare_ready:>10.3f}")
        print(f"{'bare first session':<22}{bare_session:>10.3f}")
        boot = med([c["bootstrap"] for c in cell_runs])
        print(f"\nbootstrap / bare (start + first session)     = {boot / (bare_ready + bare_session):.3f}  (goal <= 1.10)")
        print(f"bootstrap without session / bare start       = "
              f"{(boot - med([c['session'] for c in cell_runs])) / bare_ready:.3f}")
        print(f"teardown                      = {med([c['teardown'] for c in cell_runs]):.3f}s (goal < 0.5 s)")
        cell_rss = med([c["rss"] for c in cell_runs])
        print(f"idle RSS per cell (with its session) = {cell_rss / 2**20:.0f} MiB; bare server {bare_rss / 2**20:.0f} MiB "
              f"(ratio {cell_rss / bare_rss:.3f})")

        leaks = await leak_check(engine, repo, tasks)
        print(f"\n{tasks} sequential tasks: {leaks['committed']} committed; "
              f"fds {leaks['fds_before']} -> {leaks['fds_after']}, "
              f"child processes {leaks['children_before']} -> {leaks['children_after']}, "
              f"marked servers left {leaks['marked_servers_after']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main_async(args.cells, args.tasks))


if __name__ == "__main__":
    sys.exit(main())
