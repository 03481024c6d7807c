"""The merge queue at the engine level: real git, the real test command under the cells'
confinement (no Kubernetes, no opencode)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest

from reactor.mergequeue import EntryState, FileStore, LocalBranch, MemoryStore, MergeQueue, PushedBranch, QueueConfig
from reactor_dev.testing.mergequeue import (TEST_COMMAND, base_history, confined_tests, failing_commits, git,
                                        make_queue_repo, make_result, module)


def new_queue(repo, work_dir, store=None, base=None, events=None, **config):
    config = QueueConfig(repo=str(repo), base_branch="main", test_command=TEST_COMMAND, **config)
    return MergeQueue(store or MemoryStore(), base or LocalBranch(repo, "main"), confined_tests(work_dir), config,
                      on_event=events.append if events is not None else None)


def carried(repo, entry_id):
    """How many commits on main carry the entry (it must be exactly one once integrated)."""
    return git(repo, "log", "--format=%B", "main").count(f"Reactor-Queue-Entry: {entry_id}\n")


async def test_ten_results_on_different_files_all_integrate_through_a_push_and_every_base_commit_is_green(
        tmp_path, work_dir):
    origin = make_queue_repo(tmp_path / "origin", {"core.py": module("core")})
    mirror = tmp_path / "mirror.git"
    git(tmp_path, "clone", "--quiet", "--bare", str(origin), str(mirror))
    git(mirror, "config", "remote.origin.fetch", "+refs/heads/*:refs/heads/*")  # as the operator's mirrors
    ids = [f"t{i}" for i in range(10)]
    queue = new_queue(mirror, work_dir, base=PushedBranch(mirror, "origin", "main"), max_batch=4, max_parallel=2)
    for entry_id in ids:
        queue.enqueue(entry_id, *make_result(mirror, entry_id, {f"{entry_id}.py": module(entry_id)}))
    await queue.drain()
    assert [e.state for e in queue.state.entries] == [EntryState.INTEGRATED] * 10
    history = base_history(origin)
    assert len(history) == 11 and all(carried(origin, i) == 1 for i in ids)
    assert failing_commits(origin, history) == []
    assert git(origin, "ls-tree", "--name-only", "main").split() == sorted(["core.py", "run_tests.py", *(f"{i}.py" for i in ids)])
    assert queue.state.stats.test_runs == 3  # batches of 4, 4, 2, all green
    # No branch of the mirror moved (its ref ledger vouches for them; its own fetch updates them).
    assert git(mirror, "rev-parse", "main") == history[0]


async def test_semantic_conflict_ejects_only_the_culprit_and_the_base_never_goes_red(tmp_path, work_dir):
    repo = make_queue_repo(tmp_path / "repo", {
        "lib.py": "def greet():\n    return 'hi'\n",
        "user1.py": "import lib\n\ndef check():\n    assert lib.greet() == 'hi'\n",
    })
    rename = {"lib.py": "def welcome():\n    return 'hi'\n",
              "user1.py": "import lib\n\ndef check():\n    assert lib.welcome() == 'hi'\n"}
    old_call = {"user2.py": "import lib\n\ndef check():\n    assert lib.greet().startswith('h')\n"}
    queue = new_queue(repo, work_dir, max_batch=3)
    queue.enqueue("a", *make_result(repo, "a", rename))
    queue.enqueue("b", *make_result(repo, "b", old_call))  # green alone, textually clean with A
    queue.enqueue("c", *make_result(repo, "c", {"c.py": module("c")}))
    await queue.drain()
    a, b, c = queue.state.entries
    assert (a.state, b.state, c.state) == (EntryState.INTEGRATED, EntryState.EJECTED, EntryState.INTEGRATED)
    assert b.reason == "SemanticConflict" and "has no attribute 'greet'" in b.detail
    history = base_history(repo)
    assert len(history) == 3 and failing_commits(repo, history) == []
    assert carried(repo, "b") == 0


async def test_one_bad_result_in_eight_is_found_by_bisection_within_2_log2_n_extra_runs(tmp_path, work_dir):
    repo = make_queue_repo(tmp_path / "repo", {"core.py": module("core")})
    events = []
    queue = new_queue(repo, work_dir, events=events, max_batch=8)
    for i in range(8):
        body = "assert 1 + 1 == 3, 'bad arithmetic'" if i == 4 else ""
        queue.enqueue(f"r{i}", *make_result(repo, f"r{i}", {f"r{i}.py": module(f"r{i}", body)}))
    await queue.drain()
    kinds = [e.kind for e in events]
    first_red = next(i for i, e in enumerate(events) if e.kind == "tested" and e.detail != "passed")
    ejected = kinds.index("ejected")
    extra_runs = kinds[first_red:ejected].count("testing")
    assert events[ejected].entry_id == "r4" and extra_runs <= 2 * math.ceil(math.log2(8))
    assert [e.id for e in queue.state.entries if e.state is EntryState.INTEGRATED] == [f"r{i}" for i in range(8) if i != 4]
    assert failing_commits(repo, base_history(repo)) == []
    # One run for the batch, three to bisect it, one for the three behind the culprit.
    assert queue.state.stats.test_runs == 5


async def test_a_textual_conflict_is_reported_as_such_without_a_test_run(tmp_path, work_dir):
    repo = make_queue_repo(tmp_path / "repo", {"shared.py": "VALUE = 1\n"})
    queue = new_queue(repo, work_dir, max_batch=2)
    queue.enqueue("a", *make_result(repo, "a", {"shared.py": "VALUE = 2\n"}))
    queue.enqueue("b", *make_result(repo, "b", {"shared.py": "VALUE = 3\n"}))
    await queue.drain()
    a, b = queue.state.entries
    assert a.state is EntryState.INTEGRATED and git(repo, "show", "main:shared.py") == "VALUE = 2"
    assert (b.state, b.reason) == (EntryState.EJECTED, "TextualConflict") and "shared.py" in b.detail
    assert queue.state.stats.test_runs == 1


@pytest.mark.parametrize("crash_at", ["advancing", "advanced"])
async def test_a_driver_killed_around_the_base_advance_resumes_without_merging_twice(tmp_path, work_dir, crash_at):
    repo = make_queue_repo(tmp_path / "repo", {"core.py": module("core")})
    store = FileStore(tmp_path / "queue.json")
    queue = new_queue(repo, work_dir, store=store, max_batch=1)
    for entry_id in ("x", "y", "z"):
        queue.enqueue(entry_id, *make_result(repo, entry_id, {f"{entry_id}.py": module(entry_id)}))
    killed = subprocess.run([sys.executable, "-m", "reactor_dev.testing.mergequeue", str(store.path), str(work_dir),
                             crash_at], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert store.load().pending is not None  # it died with an advance in flight
    resumed = MergeQueue(store, LocalBranch(repo, "main"), confined_tests(work_dir))
    await resumed.drain()
    assert [e.state for e in store.load().entries] == [EntryState.INTEGRATED] * 3
    assert [carried(repo, i) for i in ("x", "y", "z")] == [1, 1, 1]
    history = base_history(repo)
    assert len(history) == 4 and failing_commits(repo, history) == []


async def test_a_driver_that_lost_its_record_does_not_integrate_a_result_twice(tmp_path, work_dir):
    # A replica that lost its Lease mid-advance: its record of the advance never reached the
    # store, and the next driver sees the result as still queued.
    repo = make_queue_repo(tmp_path / "repo", {"core.py": module("core")})
    commit, base = make_result(repo, "x", {"x.py": module("x")})
    first = new_queue(repo, work_dir)
    first.enqueue("x", commit, base)
    await first.drain()
    tip = git(repo, "rev-parse", "main")
    second = new_queue(repo, work_dir)
    second.enqueue("x", commit, base)
    await second.drain()
    assert second.state.entries[0].integrated_as == tip and git(repo, "rev-parse", "main") == tip
    assert second.state.stats.test_runs == 0


async def test_the_test_command_runs_confined_to_its_own_checkout(tmp_path, work_dir):
    repo = make_queue_repo(tmp_path / "repo", {"core.py": module("core")})
    planted = tmp_path / "planted"
    main_ref = repo / "refs" / "heads" / "main"
    hostile = textwrap.dedent(f'''\
        def check():
            for path in ({str(planted)!r}, {str(main_ref)!r}):
                try:
                    with open(path, "w") as f:
                        f.write("0" * 40 + "\\n")
                    print("WROTE", path)
                except OSError as exc:
                    print("DENIED", path, exc.errno)
    ''')
    queue = new_queue(repo, work_dir)
    queue.enqueue("h", *make_result(repo, "h", {"hostile.py": hostile}))
    await queue.drain()
    assert queue.state.entries[0].state is EntryState.INTEGRATED
    assert not planted.exists()
    assert base_history(repo)[-1] == queue.state.entries[0].integrated_as  # main was not overwritten


def test_enqueue_takes_only_one_commit_on_its_base_and_is_idempotent(tmp_path, work_dir):
    repo = make_queue_repo(tmp_path / "repo", {"core.py": module("core")})
    queue = new_queue(repo, work_dir)
    commit, base = make_result(repo, "a", {"a.py": module("a")})
    queue.enqueue("a", commit, base)
    assert queue.enqueue("a", commit, base) is queue.state.entries[0] and queue.state.depth == 1
    with pytest.raises(ValueError, match="not a single commit on"):
        queue.enqueue("b", commit, git(repo, "rev-parse", f"{base}^{{tree}}") and commit)
