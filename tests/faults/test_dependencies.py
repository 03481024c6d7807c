"""Tasks on tasks (spec.dependsOn) on the real stack: a chain, a diamond that merges, a
diamond whose parents conflict, and a failed parent. All rows share one origin repository
and one operator; they run at once and each test checks one rule a user relies on."""

from __future__ import annotations

import threading

import pytest

from reactor_dev.testing.scripted_model import Scenario, edit, text, wait_for, write
from reactor_dev.testing.repos import git
from reactor_dev.testing.matrix import Matrix, Origin, Row
from reactor_dev.testing.tasks import condition
from reactor_dev.testing.workers import port_range

pytestmark = [pytest.mark.opencode, pytest.mark.kube, pytest.mark.timeout(1200)]

FIX = edit("calc.py", "return a - b", "return a + b")
OTHER_FIX = edit("calc.py", "return a - b", "return b + a")  # the same line, changed differently


@pytest.fixture(scope="module")
def graph(matrix: Matrix) -> dict[str, Row]:
    matrix.start_operator("--port-range", port_range("23400-23500"), "--max-agents", "3")
    script, origin = matrix.model.script, Origin(matrix.root / "origins", "shared")
    release_a = threading.Event()
    rows: dict[str, Row] = {}

    def row(name: str, steps, **spec) -> Row:
        script.add(Scenario(f"{name}:", steps))
        rows[name] = matrix.row(name, origin=origin, **spec)
        return rows[name]

    # dep-a holds its first model step until the test has seen dep-b wait for it.
    row("dep-a", [wait_for(release_a), FIX, text("Fixed.")])
    # B's tests pass only on A's fix: it must start at A's result, not at main.
    row("dep-b", [write("sub.py", "def sub(a, b):\n    return a - b\n"), text("Added.")], dependsOn=["dep-a"])
    row("dep-d", [write("extra.py", "X = 1\n"), text("Added.")], test={"command": "python3 -c 'import extra'"})
    row("dep-e", [write("e.txt", "both\n"), text("Done.")], dependsOn=["dep-a", "dep-d"],
        test={"command": "python3 -m pytest -q && python3 -c 'import extra'"})
    row("dep-c", [OTHER_FIX, text("Fixed.")])
    row("dep-f", [write("f.txt", "never\n"), text("Done.")], dependsOn=["dep-a", "dep-c"])
    row("dep-p", [text("I cannot do this.")])  # changes nothing: fails with NoChanges
    row("dep-q", [write("q.txt", "never\n"), text("Done.")], dependsOn=["dep-p"])

    # dep-b is applied before its parent exists (GitOps applies a directory in any order).
    matrix.apply(rows["dep-b"])
    matrix.wait(rows["dep-b"], lambda o: "dep-a not created yet" in ((o or {}).get("status") or {}).get("message", ""),
                "waiting for a parent not created yet")
    for name in ("dep-a", "dep-d", "dep-e", "dep-c", "dep-f", "dep-p", "dep-q"):
        matrix.apply(rows[name])
    matrix.wait(rows["dep-a"], lambda o: ((o or {}).get("status") or {}).get("phase") == "Executing", "dep-a executing")
    waiting = matrix.wait(rows["dep-b"], lambda o: ((o or {}).get("status") or {}).get("waitingOn") == "dep-a",
                          "dep-b waiting on dep-a")
    rows["dep-b"].waiting = waiting  # type: ignore[attr-defined]
    rows["dep-b"].table = matrix.cluster.kubectl("get", "-n", matrix.namespace, "agenttasks").stdout  # type: ignore[attr-defined]
    release_a.set()
    matrix.wait_all_terminal(list(rows.values()))
    return rows


def verdict(row: Row) -> tuple[str, str]:
    return row.final["status"]["phase"], condition(row.final)["reason"]


def parents(origin: Origin, commit: str) -> list[str]:
    return git(origin.path, "rev-parse", f"{commit}^@").split()


def test_a_dependent_waits_then_starts_at_its_parents_result_commit(graph, matrix):
    a, b = graph["dep-a"], graph["dep-b"]
    waiting = b.waiting["status"]
    assert (waiting["phase"], condition(b.waiting)["reason"]) == ("Pending", "DependenciesPending")
    assert "waiting for dep-a to succeed" in waiting["message"]
    header, *lines = b.table.splitlines()
    assert "WAITING-ON" in header.split()
    assert next(line for line in lines if line.startswith("dep-b ")).split()[1:2] == ["Pending"]
    assert "dep-a" in next(line for line in lines if line.startswith("dep-b ")).split()
    assert verdict(a) == verdict(b) == ("Succeeded", "Committed"), (a.final["status"]["message"], b.final["status"])
    a_commit, b_commit = a.final["status"]["result"]["commit"], b.final["status"]["result"]["commit"]
    assert parents(a.origin, b_commit) == [a_commit], "B's commit sits on A's result commit"
    assert b.final["status"]["result"]["startCommit"] == a_commit
    assert b.final["status"].get("waitingOn") is None
    assert b.final["status"]["dependencies"] == [{"name": "dep-a", "uid": a.uid, "commit": a_commit}]
    assert git(a.origin.path, "diff-tree", "-r", "--name-only", "--no-commit-id", a_commit, b_commit) == "sub.py"
    reasons = [e["reason"] for e in matrix.events(b)]
    assert "DependenciesMet" in reasons and reasons.index("DependenciesPending") < reasons.index("Bootstrapping")
    matrix.assert_nothing_left(a, pushed=True)
    matrix.assert_nothing_left(b, pushed=True)


def test_several_parents_start_at_reactors_merge_of_their_results(graph, matrix):
    a, d, e = graph["dep-a"], graph["dep-d"], graph["dep-e"]
    assert verdict(e) == ("Succeeded", "Committed"), e.final["status"]
    e_commit = e.final["status"]["result"]["commit"]
    [merge] = parents(e.origin, e_commit)
    assert merge == e.final["status"]["result"]["startCommit"]
    assert parents(e.origin, merge) == [a.final["status"]["result"]["commit"], d.final["status"]["result"]["commit"]]
    assert git(e.origin.path, "log", "-1", "--format=%an", merge) == "Reactor", "merged by Reactor, not by an agent"
    matrix.assert_nothing_left(d, pushed=True)
    matrix.assert_nothing_left(e, pushed=True)


def test_conflicting_parents_end_the_child_before_any_agent_starts(graph, matrix):
    c, f = graph["dep-c"], graph["dep-f"]
    assert verdict(c) == ("Succeeded", "Committed")
    assert verdict(f) == ("Failed", "ParentsConflict"), f.final["status"]
    assert "conflict in calc.py" in f.final["status"]["message"]
    assert [r for r in matrix.model.requests if r.get("scenario") == "dep-f:"] == [], "the model was never asked"
    reasons = [e["reason"] for e in matrix.events(f)]
    assert "Executing" not in reasons, f"a server was started for the blocked child: {reasons}"
    assert not f.ports, "no cell port was ever given to it"
    matrix.assert_nothing_left(c, pushed=True)
    matrix.assert_nothing_left(f, pushed=False)


def test_a_failed_parent_fails_only_its_dependents(graph, matrix):
    p, q = graph["dep-p"], graph["dep-q"]
    assert verdict(p) == ("Failed", "NoChanges")
    assert verdict(q) == ("Failed", "DependencyFailed"), q.final["status"]
    assert "dep-p failed (NoChanges)" in q.final["status"]["message"]
    assert [r for r in matrix.model.requests if r.get("scenario") == "dep-q:"] == []
    assert "Bootstrapping" not in [e["reason"] for e in matrix.events(q)]
    # Its siblings in the namespace ran on (dep-a, dep-b... all succeeded above).
    assert all(verdict(graph[n]) == ("Succeeded", "Committed") for n in ("dep-a", "dep-b", "dep-d", "dep-c"))
    matrix.assert_nothing_left(p, pushed=False)
    matrix.assert_nothing_left(q, pushed=False)
