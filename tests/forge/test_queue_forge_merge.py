"""The merge queue lands results that have a pull request through the forge's merge, on a
real Gitea: the pull request's head is pointed at the tested candidate and merged fast-forward
only, guarded by that head, so the base becomes exactly the tested commit and the pull request
reads as merged. A result without a pull request is pushed as before. A pull request whose
head someone else moved is never merged: the entry is tested again each time and ejected
(MergeRefused) after the third refusal; the base never moves for it."""

from __future__ import annotations

import uuid

from reactor.forge import forge_repository, open_forge
from reactor.infra.mirrors import GitCredentials
from reactor.mergequeue import EntryState, ForgeMerge, MemoryStore, MergeQueue, PushedBranch, QueueConfig
from reactor.mergequeue.queue import MAX_MERGE_REFUSALS
from reactor_dev.testing.forge import ADMIN
from reactor_dev.testing.mergequeue import (TEST_COMMAND, base_history, commit_files, confined_tests,
                                            failing_commits, git, make_queue_repo, make_result, module)


async def test_results_with_pull_requests_land_through_the_forge_and_a_moved_head_is_never_merged(
        gitea, tmp_path, work_dir):
    name = f"queue-{uuid.uuid4().hex[:8]}"
    repo = make_queue_repo(tmp_path / "repo", {"shared.py": "VALUE = 1\n"})
    results = {"a": {"a.py": module("a")}, "b": {"b.py": module("b")}, "c": {"c.py": module("c")},
               "d": {"d.py": module("d")}}
    made = {entry: make_result(repo, entry, changes)[0] for entry, changes in results.items()}
    gitea.create_repository(name, repo, branches=("main", *(f"reactor/{e}" for e in results)))
    url = gitea.repo_url(name)
    forge = open_forge(forge_repository(url, "gitea"), gitea.token)
    try:
        numbers = {e: (await forge.create_pull_request(f"reactor/{e}", "main", f"Task {e}", "", False)).number
                   for e in ("a", "c", "d")}
    finally:
        await forge.aclose()
    # Someone pushes to d's branch after its result was queued: not what the queue tests.
    foreign = commit_files(repo, made["d"], {"d.py": module("d", "raise SystemExit('not tested')")}, "foreign")
    gitea.push(repo, name, f"{foreign}:refs/heads/reactor/d")

    async def forge_for(entry_id: str):
        return open_forge(forge_repository(url, "gitea"), gitea.token)

    branch = PushedBranch(repo, url, "main", GitCredentials(username=ADMIN, password=gitea.password))
    queue = MergeQueue(MemoryStore(), branch, confined_tests(work_dir),
                       QueueConfig(str(repo), "main", TEST_COMMAND, max_batch=4),
                       pull_requests=ForgeMerge(branch, forge_for))
    for entry in ("a", "b", "c", "d"):
        queue.enqueue_result(entry, made[entry], numbers.get(entry, 0))
    await queue.drain()

    states = {e: queue.state.get(e).state for e in results}
    assert states == {"a": EntryState.INTEGRATED, "b": EntryState.INTEGRATED, "c": EntryState.INTEGRATED,
                      "d": EntryState.EJECTED}
    d = queue.state.get("d")
    assert (d.reason, d.merge_refusals) == ("MergeRefused", MAX_MERGE_REFUSALS) and "moved" in d.detail
    pulls = {p["number"]: p for p in gitea.pull_requests(name)}
    for entry in ("a", "c"):
        pull = pulls[numbers[entry]]
        # Merged, and its head is the very commit the base now carries for it (tested).
        assert pull["merged"] and pull["state"] == "closed", pull
        assert pull["head"]["sha"] == queue.state.get(entry).integrated_as
    assert not pulls[numbers["d"]]["merged"] and pulls[numbers["d"]]["head"]["sha"] == foreign
    git(repo, "fetch", "--quiet", url, "+refs/heads/main:refs/heads/forge-main")
    history = base_history(repo, "forge-main")
    assert history[-1] == queue.state.get("c").integrated_as
    assert sorted(git(repo, "ls-tree", "--name-only", "forge-main").split()) == [
        "a.py", "b.py", "c.py", "run_tests.py", "shared.py"]
    assert failing_commits(repo, history) == []
    # a, b and c once each (a and c alone: one merge each), d once per refusal.
    assert queue.state.stats.test_runs == 3 + MAX_MERGE_REFUSALS
