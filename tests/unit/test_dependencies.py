"""The rules of spec.dependsOn (kube/dependencies.py): start, wait or fail."""

import asyncio

from reactor.kube.dependencies import Decision, TaskView, Verdict, decide
from reactor.kube.resource import TaskRef
from reactor.kube.supervisor import DependencyCheck
from reactor.workflow.types import Reason

URL = "file:///srv/repos/app.git"


def task(name: str, phase: str | None = None, *, commit: str | None = None, depends_on: tuple[str, ...] = (),
         uid: str | None = None, url: str = URL, reason: str = "", deleting: bool = False) -> TaskView:
    return TaskView(name=name, uid=uid or f"uid-{name}", phase=phase, reason=reason, commit=commit, url=url,
                    depends_on=depends_on, deleting=deleting)


def run(me: TaskView, *others: TaskView, seen: dict[str, str] | None = None) -> Decision:
    return decide(me, {t.name: t for t in (me, *others)}, seen or {})


def test_starts_at_the_parents_result_commits_in_order_once_all_succeeded():
    me = task("c", depends_on=("b", "a"))
    decision = run(me, task("a", "Succeeded", commit="a" * 40), task("b", "Succeeded", commit="b" * 40))
    assert decision.verdict is Verdict.START
    assert decision.start_commits == ("b" * 40, "a" * 40)
    assert decision.seen == {"a": "uid-a", "b": "uid-b"}


def test_waits_while_a_parent_runs_or_does_not_exist_yet():
    me = task("c", depends_on=("a", "b", "later"))
    decision = run(me, task("a", "Succeeded", commit="a" * 40), task("b", "Executing"))
    assert (decision.verdict, decision.reason) == (Verdict.WAIT, Reason.DEPENDENCIES_PENDING)
    assert decision.waiting_on == ("b", "later")
    assert "later not created yet" in decision.message
    assert "later" not in decision.seen, "a parent never seen is not remembered"


def test_a_failed_parent_fails_the_dependent_naming_why():
    decision = run(task("c", depends_on=("a", "b")), task("a", "Failed", reason="TestsFailed"), task("b", "Pending"))
    assert (decision.verdict, decision.reason) == (Verdict.FAIL, Reason.DEPENDENCY_FAILED)
    assert "a failed (TestsFailed)" in decision.message


def test_a_parent_seen_then_deleted_or_replaced_fails_the_dependent():
    me = task("c", depends_on=("a",))
    assert run(me, seen={"a": "uid-a"}).verdict is Verdict.FAIL
    assert "deleted" in run(me, task("a", "Executing", deleting=True)).message
    replaced = run(me, task("a", "Succeeded", commit="a" * 40, uid="uid-new"), seen={"a": "uid-old"})
    assert replaced.verdict is Verdict.FAIL and "created again" in replaced.message


def test_a_parent_on_another_repository_cannot_be_built_on():
    decision = run(task("c", depends_on=("a",)), task("a", "Succeeded", commit="a" * 40, url="file:///other.git"))
    assert decision.verdict is Verdict.FAIL and "another repository" in decision.message


def test_a_cycle_fails_instead_of_waiting_forever():
    decision = run(task("a", depends_on=("b",)), task("b", "Pending", depends_on=("c",)),
                   task("c", "Pending", depends_on=("a",)))
    assert decision.verdict is Verdict.FAIL and "cycle: a -> b -> c -> a" in decision.message
    # A finished task's own dependencies no longer matter: no cycle through it.
    assert run(task("a", depends_on=("b",)), task("b", "Succeeded", commit="b" * 40, depends_on=("a",))).verdict \
        is Verdict.START


def test_view_from_an_object():
    body = {"metadata": {"name": "a", "uid": "u1", "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"repository": {"url": URL}, "dependsOn": ["z"]},
            "status": {"phase": "Failed", "result": {"commit": None},
                       "conditions": [{"type": "Confined", "reason": "Landlock"},
                                      {"type": "Succeeded", "reason": "DependencyFailed"}]}}
    assert TaskView.from_body(body) == task("a", "Failed", uid="u1", reason="DependencyFailed", depends_on=("z",),
                                           deleting=True)


def body(name: str, phase: str | None = None, *, commit: str | None = None, depends_on: list[str] | None = None) -> dict:
    status = {"phase": phase, "result": {"commit": commit}} if phase else {}
    return {"metadata": {"namespace": "team", "name": name, "uid": f"uid-{name}"},
            "spec": {"repository": {"url": URL}, **({"dependsOn": depends_on} if depends_on else {})}, "status": status}


async def test_the_admission_check_holds_a_dependent_until_its_parent_changes_then_lets_it_be_taken():
    """The supervisor's admission hook: waiting (with waitingOn) holds the task before any slot
    or claim; a start or a fail lets it be taken (the holder then starts it or fails it)."""
    check, child = DependencyCheck(), body("b", depends_on=["a"])
    ref = TaskRef.from_body(child)
    check.saw(None, body("a", "Executing"))
    reason, message, fields = check.blocked(ref, child)
    assert reason is Reason.DEPENDENCIES_PENDING and fields["waitingOn"] == "a"
    assert fields["dependencies"] == [{"name": "a", "uid": "uid-a", "commit": None}]
    check.saw(None, body("a", "Succeeded", commit="a" * 40))
    await asyncio.wait_for(check.changed(ref), 5)  # woken by the parent's change, not the re-check
    assert check.blocked(ref, child) is None
    assert check.decision(ref, child).start_commits == ("a" * 40,)
    check.saw("DELETED", body("a"))
    assert check.blocked(ref, child) is None and check.decision(ref, child).verdict is Verdict.FAIL
    assert check.blocked(TaskRef.from_body(body("c")), body("c")) is None, "no dependsOn: never held"


async def test_the_fleet_page_shows_who_waits_on_whom(tmp_path):
    """Every replica sees every task's changes: the page's JSON gives each task of the graph
    its dependencies, those it still waits for and why; the page has the column for them.
    A change seen late never moves a task's phase back."""
    from aiohttp.test_utils import TestClient, TestServer

    from reactor.observe.observation import Observatory
    from reactor.observe.web import build_app

    observatory = Observatory(tmp_path / "transcripts")
    check = DependencyCheck(observatory.views)
    check.saw(None, body("a", "Executing"))
    waiting = body("c", "Pending", depends_on=["a", "b"])
    waiting["status"].update(waitingOn="a", message="waiting for a to succeed",
                             conditions=[{"type": "Succeeded", "reason": "DependenciesPending"}])
    check.saw(None, body("b", "Succeeded", commit="b" * 40))
    check.saw(None, waiting)
    async with TestClient(TestServer(build_app(observatory))) as client:
        listed = {t["name"]: t for t in (await (await client.get("/api/v1/tasks")).json())["tasks"]}
        page = await (await client.get("/")).text()
        script = await (await client.get("/static/app.js")).text()
    assert set(listed) == {"c"}, "tasks outside the graph are shown by the runs that ran them"
    assert listed["c"]["depends_on"] == ["a", "b"] and listed["c"]["waiting_on"] == ["a"]
    assert (listed["c"]["phase"], listed["c"]["reason"]) == ("Pending", "DependenciesPending")
    assert listed["c"]["message"] == "waiting for a to succeed"
    assert "<th>Depends on</th>" in page and 'id="detail-deps"' in page
    assert "task.waiting_on" in script and "task.depends_on" in script

    started = body("c", "Executing", depends_on=["a", "b"])
    check.saw(None, started)
    check.saw(None, waiting)  # an older version of the object, seen late
    view = observatory.views.get("team", "c")
    assert view is not None and (view.phase, view.waiting_on, view.depends_on) == ("Executing", [], ["a", "b"])
