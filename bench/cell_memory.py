"""Per-cell memory with many cells alive, for several server environments, in the same run.

For each variant: N cells run at once through the real engine (real opencode, scripted model);
each agent edits a file and runs the repository's tests with its bash tool, then its next model
call is held open, so all N cells are alive and idle after a real turn and a test run. Then:

  - PSS per cell (pages shared between cells, such as the opencode binary's, counted once),
    summed over every process of the cell, after the cells settled;
  - the largest PSS a cell reached while running (sampled), which admission must reserve;
  - how many cells fit in this machine's memory by each figure.

Then a safety run per variant: full Test-Commit-Revert tasks with a heavy turn (a large file
written and read back, megabytes of tool output, many steps) must all commit.

Each variant also reports the CPU its idle cells burn (a heap capped too small keeps the
collector busy): the default (no variable) was chosen on both figures.

    python bench/cell_memory.py [--cells 10] [--variants none,ram256,...] [--heavy 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from reactor.infra.memory import cell_memory
from reactor_dev.testing.repos import make_repo
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, bash, edit, hang, text, write
from reactor.workflow.engine import Engine, EngineSettings
from reactor.workflow.tcr import run_task
from reactor.workflow.types import TaskSpec

MiB = 1 << 20
SEED = os.environ.get("REACTOR_OPENCODE_SEED")
_ENVS: dict[str, dict[str, str]] = {
    "none": {},
    "ram512": {"BUN_JSC_forceRAMSize": str(512 * MiB)},
    "ram256": {"BUN_JSC_forceRAMSize": str(256 * MiB)},
    "ram192": {"BUN_JSC_forceRAMSize": str(192 * MiB)},
    "ram128": {"BUN_JSC_forceRAMSize": str(128 * MiB)},
    "ram128+purge": {"BUN_JSC_forceRAMSize": str(128 * MiB), "MIMALLOC_PURGE_DELAY": "0"},
    "purge": {"MIMALLOC_PURGE_DELAY": "0"},
    "ram256+nojit": {"BUN_JSC_forceRAMSize": str(256 * MiB), "BUN_JSC_useJIT": "0"},
    "ram256+purge": {"BUN_JSC_forceRAMSize": str(256 * MiB), "MIMALLOC_PURGE_DELAY": "0"},
    # Bun's own collector switches: level 1 collects on more occasions; the timer runs its
    # idle collection more often (default every 1000 ms).
    "ram256+gc1": {"BUN_JSC_forceRAMSize": str(256 * MiB), "BUN_GARBAGE_COLLECTOR_LEVEL": "1"},
    "ram256+gctimer": {"BUN_JSC_forceRAMSize": str(256 * MiB), "BUN_GC_TIMER_INTERVAL": "100"},
}
# "<env>+seed": the cell's OpenCode config dir is pre-seeded with the finished install of
# @opencode-ai/plugin ($REACTOR_OPENCODE_SEED, built by `make opencode`), so the server skips
# the npm install it otherwise runs in every cell. Without "+seed" the cell installs it.
VARIANTS: dict[str, tuple[dict[str, str], bool]] = {name: (env, False) for name, env in _ENVS.items()}
VARIANTS.update({f"{name}+seed": (env, True) for name, env in _ENVS.items()})
FIX = edit("calc.py", "return a - b", "return a + b")
TESTS = "python3 -m pytest -q"


def engine_for(work: Path, env: dict[str, str], seeded: bool, cells: int) -> Engine:
    if seeded and not SEED:
        raise SystemExit("+seed variants need REACTOR_OPENCODE_SEED (make opencode builds .tools/opencode-seed)")
    return Engine(EngineSettings(work_dir=work, opencode_seed=Path(SEED) if seeded else None, health_timeout=60,
                                 max_agents=cells, server_env=env, memory_admission=False))


async def alive_after_a_turn(name: str, env: dict[str, str], seeded: bool, cells: int, tmp: Path) -> dict:
    repo = make_repo(tmp / f"repo-{name}")
    engine = engine_for(tmp / f"work-{name}", env, seeded, cells)
    work_dir, owner = str(engine.work_dir), engine.owner.token
    scenarios = [Scenario(f"MEM-{i}:", [FIX, bash(TESTS), hang(), text("done")]) for i in range(cells)]
    peaks: dict[str, int] = {}
    with ScriptedModel(scenarios) as model:
        config = model.opencode_config()
        specs = [TaskSpec(task_id=f"MEM-{i}", prompt=f"MEM-{i}: fix add", repo=repo, test_command=TESTS,
                          opencode_config=config, timeout=600) for i in range(cells)]
        started = time.monotonic()
        runs = [asyncio.create_task(run_task(spec, engine)) for spec in specs]
        try:
            while sum(1 for r in model.requests if r["kind"] == "hang") < cells:
                if time.monotonic() - started > 900:
                    raise RuntimeError(f"{name}: cells did not all reach the held call in 900 s")
                if any(run.done() for run in runs):
                    failed = [run.result() for run in runs if run.done()]
                    raise RuntimeError(f"{name}: a cell ended early: {failed[0].reason}: {failed[0].message}")
                for cell, pss in (await asyncio.to_thread(cell_memory, work_dir, owner)).items():
                    peaks[cell] = max(peaks.get(cell, 0), pss)
                await asyncio.sleep(0.25)
            turn = time.monotonic() - started
            # Idle cells: let start-up and turn allocations (and OpenCode's background plugin
            # install, which starts seconds after the first session) settle: a measurement window.
            # The CPU the idle cells burn meanwhile (a heap sized too small collects all the time).
            cpu_before, window_start = await asyncio.to_thread(_cell_cpu, work_dir, owner), time.monotonic()
            for _ in range(20):
                await asyncio.sleep(1)
                settled = await asyncio.to_thread(cell_memory, work_dir, owner)
                for cell, pss in settled.items():
                    peaks[cell] = max(peaks.get(cell, 0), pss)
            rss = await asyncio.to_thread(_cell_rss, work_dir, owner)
            cpu_after, window = await asyncio.to_thread(_cell_cpu, work_dir, owner), time.monotonic() - window_start
        finally:
            for run in runs:
                run.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
    return {"pss": statistics.median(settled.values()), "pss_total": sum(settled.values()),
            "rss": statistics.median(rss.values()), "peak": max(peaks.values()), "cells": len(settled),
            "turn": turn,
            "idle_cpu": statistics.median(cpu_after[c] - cpu_before.get(c, 0.0) for c in cpu_after) / window}


def _cell_rss(work_dir: str, owner: str) -> dict[str, int]:
    return _per_cell(work_dir, owner, lambda process: process.memory_info().rss)


def _cell_cpu(work_dir: str, owner: str) -> dict[str, float]:
    """CPU seconds (user + system) each cell's live processes have used so far."""
    return _per_cell(work_dir, owner, lambda process: sum(process.cpu_times()[:2]))


def _per_cell(work_dir: str, owner: str, figure):
    from reactor.infra.processes import MARK_CELL, MARK_OWNER, MARK_WORK_DIR

    cells: dict = {}
    for process in psutil.process_iter(["pid"]):
        try:
            env = process.environ()
            if env.get(MARK_WORK_DIR) == work_dir and env.get(MARK_OWNER) == owner and MARK_CELL in env:
                cells[env[MARK_CELL]] = cells.get(env[MARK_CELL], 0) + figure(process)
        except (psutil.Error, OSError):
            continue
    return cells


async def heavy_tasks(name: str, env: dict[str, str], seeded: bool, count: int, tmp: Path) -> dict:
    """Full TCR tasks whose turn is heavy for the server's heap: a 4 MB file written and read
    back, 8 MB of bash output, and 10 small steps, then the fix and the test run."""
    repo = make_repo(tmp / f"heavy-repo-{name}")
    engine = engine_for(tmp / f"heavy-work-{name}", env, seeded, count)
    blob = "".join(f"line {i} " + "x" * 90 + "\n" for i in range(40_000))  # ~4 MB
    steps = [write("blob.txt", blob), bash("cat blob.txt | wc -c"),
             bash("python3 -c \"import sys; sys.stdout.write('y' * 8_000_000)\"")]
    steps += [bash(f"echo step {i}") for i in range(10)]
    steps += [bash("rm blob.txt"), FIX, text("Fixed.")]
    scenarios = [Scenario(f"HEAVY-{i}:", steps) for i in range(count)]
    with ScriptedModel(scenarios) as model:
        config = model.opencode_config()
        specs = [TaskSpec(task_id=f"HEAVY-{i}", prompt=f"HEAVY-{i}: fix add", repo=repo, test_command=TESTS,
                          opencode_config=config, timeout=600) for i in range(count)]
        started = time.monotonic()
        results = await asyncio.gather(*(run_task(spec, engine) for spec in specs))
    return {"committed": sum(r.succeeded for r in results), "count": count, "seconds": time.monotonic() - started,
            "reasons": sorted({f"{r.reason.value}: {r.message[:120]}" for r in results if not r.succeeded})}


async def main_async(cells: int, names: list[str], heavy: int) -> None:
    total = psutil.virtual_memory().total
    print(f"machine: {total / 2**30:.1f} GiB, {os.cpu_count()} CPUs; {cells} cells alive per variant")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="reactor-mem-") as tmp_text:
        tmp = Path(tmp_text)
        for name in names:
            env, seeded = VARIANTS[name]
            alive = await alive_after_a_turn(name, env, seeded, cells, tmp)
            print(f"  {name:<14} PSS/cell {alive['pss'] / MiB:6.0f} MiB  RSS/cell {alive['rss'] / MiB:6.0f} MiB  "
                  f"peak {alive['peak'] / MiB:6.0f} MiB  idle CPU/cell {alive['idle_cpu']:6.1%} of a core  "
                  f"{cells} cells through a turn in {alive['turn']:5.1f}s",
                  flush=True)
            safety = await heavy_tasks(name, env, seeded, heavy, tmp) if heavy else None
            rows[name] = (alive, safety)
            if safety:
                print(f"  {'':<14} heavy turn: {safety['committed']}/{safety['count']} committed in "
                      f"{safety['seconds']:.0f}s", flush=True)
            for reason in (safety or {}).get("reasons", []):
                print(f"      failed: {reason}")
    base = rows.get("none", next(iter(rows.values())))[0]
    print(f"\n{'env':<14}{'PSS/cell':>10}{'vs none':>9}{'peak':>8}{'idle CPU':>10}{'fit(PSS)':>10}{'fit(peak)':>10}  env vars")
    for name, (alive, safety) in rows.items():
        print(f"{name:<14}{alive['pss'] / MiB:>9.0f}M{alive['pss'] / base['pss']:>9.2f}{alive['peak'] / MiB:>7.0f}M"
              f"{alive['idle_cpu']:>10.1%}{int(total // alive['pss']):>10}{int(total // alive['peak']):>10}  "
              f"{' '.join(f'{k}={v}' for k, v in VARIANTS[name][0].items()) or '-'}{' +seed' * VARIANTS[name][1]}")
    print("fit = this machine's memory divided by the figure (no operator, no test suites counted)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=10)
    parser.add_argument("--variants", default="none+seed,ram256+seed", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--heavy", type=int, default=2, help="heavy full tasks per variant (0: skip)")
    args = parser.parse_args()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}")
    asyncio.run(_cancellable(main_async(args.cells, names, args.heavy)))


async def _cancellable(work) -> None:
    """SIGTERM/SIGINT cancel the run, so every cell is torn down (a background job ignores SIGINT)."""
    import signal

    task = asyncio.ensure_future(work)
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    await task


if __name__ == "__main__":
    sys.exit(main())
