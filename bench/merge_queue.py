"""Merge queue figures: N green results queued at once on one base branch, integrated by
the queue with the test command running confined (as in tests/mergequeue), real git.

For 4, 8 and 16 results, each touching its own file, all green and with one semantic
culprit (green alone, red on the base with the others), in two settings (batches of 4
tested 2 at a time; one at a time, every commit tested), prints:
  - enqueue-to-integrated latency, p50 and max;
  - test runs per integrated result (1.0: one run per result; batches go below);
  - throughput, results integrated per minute;
  - minutes the base was red: every commit the base held is tested afterwards, and a red
    one counts for as long as it was the tip (the goal is 0).

The test command sleeps ``--test-seconds`` before running, as a stand-in for a real suite.

    python bench/merge_queue.py [--test-seconds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from reactor.mergequeue import EntryState, LocalBranch, MemoryStore, MergeQueue, QueueConfig
from reactor_dev.testing.mergequeue import (TEST_COMMAND, base_history, confined_tests, failing_commits, git,
                                            make_queue_repo, make_result, module)


async def scenario(root: Path, count: int, culprit: bool, max_batch: int, max_parallel: int,
                   test_seconds: float) -> dict:
    repo = make_queue_repo(root / "repo", {"lib.py": "def greet():\n    return 'hi'\n"})
    work = root / "work"
    work.mkdir()
    command = f"sleep {test_seconds} && {TEST_COMMAND}"
    queue = MergeQueue(MemoryStore(), LocalBranch(repo, "main"), confined_tests(work),
                       QueueConfig(str(repo), "main", command, max_batch=max_batch, max_parallel=max_parallel))
    bad = count // 2 if culprit else -1
    started = time.time()
    for i in range(count):
        # The culprit calls a function another result (the first) renames: green alone.
        if i == 0 and culprit:
            changes = {"lib.py": "def welcome():\n    return 'hi'\n", "r0.py": module("r0")}
        elif i == bad:
            changes = {f"r{i}.py": "import lib\n\ndef check():\n    assert lib.greet()\n"}
        else:
            changes = {f"r{i}.py": module(f"r{i}")}
        queue.enqueue(f"r{i}", *make_result(repo, f"r{i}", changes))
    await queue.drain()
    wall = time.time() - started
    entries = queue.state.entries
    integrated = [e for e in entries if e.state is EntryState.INTEGRATED]
    latencies = [e.integrated_at - e.enqueued_at for e in integrated]
    history = base_history(repo)
    red = set(failing_commits(repo, history, command=TEST_COMMAND))
    # A red commit counts for as long as it was the tip (until the next advance, or the end).
    tips = {e.integrated_as: e.integrated_at for e in integrated}
    advances = sorted(set(tips.values()))
    red_seconds = 0.0
    for commit in red:
        since = tips.get(commit, started)
        later = [t for t in advances if t > since]
        red_seconds += (later[0] if later else time.time()) - since
    return {
        "results": count, "culprit": culprit, "max_batch": max_batch, "max_parallel": max_parallel,
        "integrated": len(integrated), "ejected": [e.id for e in entries if e.state is EntryState.EJECTED],
        "latency_p50_s": round(statistics.median(latencies), 2), "latency_max_s": round(max(latencies), 2),
        "test_runs": queue.state.stats.test_runs,
        "runs_per_integrated": round(queue.state.stats.test_runs / len(integrated), 2),
        "throughput_per_min": round(len(integrated) / wall * 60, 1), "wall_s": round(wall, 1),
        "base_red_minutes": round(red_seconds / 60, 3),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test-seconds", type=float, default=1.0)
    args = parser.parse_args()
    rows = []
    for max_batch, max_parallel in ((4, 2), (1, 1)):
        for count in (4, 8, 16):
            for culprit in (False, True):
                with tempfile.TemporaryDirectory() as tmp:
                    row = await scenario(Path(tmp), count, culprit, max_batch, max_parallel, args.test_seconds)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print(f"{'batch':>5} {'par':>3} {'n':>3} {'culprit':>7} {'integr':>6} {'lat p50':>8} {'lat max':>8} "
          f"{'runs':>4} {'runs/int':>8} {'per min':>7} {'red min':>7}")
    for r in rows:
        print(f"{r['max_batch']:>5} {r['max_parallel']:>3} {r['results']:>3} {str(r['culprit']):>7} "
              f"{r['integrated']:>6} {r['latency_p50_s']:>8} {r['latency_max_s']:>8} {r['test_runs']:>4} "
              f"{r['runs_per_integrated']:>8} {r['throughput_per_min']:>7} {r['base_red_minutes']:>7}")


if __name__ == "__main__":
    asyncio.run(main())
