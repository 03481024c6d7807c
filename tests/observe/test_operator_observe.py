"""Observability of the operator end to end: a real kube-apiserver, `reactor operator` as a
real process serving its page and /metrics, real opencode servers, real git, the scripted
model, a real Prometheus (Debian's package) and a real headless Chromium (Debian's package).

One operator and two tasks for the module (they run concurrently); the tests
check what a user would see of them.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from reactor.infra.processes import find_marked_processes
from reactor_dev.testing.helpers import wait_for
from reactor_dev.testing.kube_fixtures import temporary_namespace
from reactor_dev.testing.operator_process import free_port, operators
from reactor_dev.testing.repos import git, make_repo
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, bash, edit, text, write
from reactor_dev.testing.tasks import agent_task, condition, kubectl_ok
from reactor_dev.testing.workers import port_range

pytestmark = pytest.mark.opencode

SECRET = "s3cret-team-token-91f2"
# The live task's first tool call blocks until the test releases it: progress and `reactor
# logs -f` are checked while the agent's turn is provably still going.
WAIT = "until [ -e .release ]; do sleep 0.05; done; rm .release; echo released"
FIX = edit("calc.py", "return a - b", "return a + b")
BIG_STEP = (40_000, 1_000)  # tokens of one runaway model step
PHASE_RGB = {"Executing": (0x8e, 0x24, 0xaa), "Testing": (0xfb, 0x8c, 0x00), "Succeeded": (0x2e, 0x7d, 0x32),
             "Failed": (0xb7, 0x1c, 0x1c)}


def runaway(marker: str, steps: int = 12) -> Scenario:
    return Scenario(marker, [write(f"notes/{i}.txt", f"{i}\n", usage=BIG_STEP) for i in range(steps)] + [text("done")])


def host_ip() -> str:
    """An address of this machine the API server can dial for the service proxy (it refuses
    loopback endpoints)."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    pytest.fail("no non-loopback IPv4 address on this machine: the service proxy needs one")


class LogsFollower:
    """`reactor logs TASK -f` as a real subprocess with only a kubeconfig."""

    def __init__(self, cluster, namespace: str, task: str, *extra: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reactor.cli", "logs", task, "-n", namespace, "--kubeconfig",
             str(cluster.kubeconfig_path), "--operator-service", f"{namespace}/reactor:web", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.output = io.StringIO()
        self.changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self.changed:
                self.output.write(line)
                self.changed.notify_all()

    def wait_for(self, needle: str, timeout: float = 60) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: needle in self.output.getvalue() or self.process.poll() is not None,
                                         timeout):
                raise AssertionError(f"`reactor logs -f` did not show {needle!r} in {timeout}s:\n{self.output.getvalue()}")
        assert needle in self.output.getvalue(), f"{self.output.getvalue()}\nstderr: {self.process.stderr.read()}"

    def finish(self, timeout: float = 60) -> str:
        try:
            self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._reader.join(5)
        return self.output.getvalue()


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def module_namespace(kube_api) -> str:
    with temporary_namespace(kube_api, f"observe-{uuid.uuid4().hex[:8]}") as name:
        yield name


@pytest.fixture(scope="module")
def observed(crd_installed, module_namespace, tmp_path_factory):
    """The operator serving its page and /metrics on this machine's address, reachable
    through a Service (no selector; an EndpointSlice naming that address, as the control
    plane's endpoint controller would for the operator's pod)."""
    cluster, namespace = crd_installed, module_namespace
    work_dir = tmp_path_factory.mktemp("observe-work")
    ip, port = host_ip(), free_port()
    # The API server proxies only to endpoints that are pods with that IP: the operator's
    # Pod object stands for the process (no kubelet runs here), its status naming our address.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "reactor-operator"},
           "spec": {"containers": [{"name": "operator", "image": "reactor:0.1.0"}]}}
    kubectl_ok(cluster, "apply", "-n", namespace, "-f", "-", input=json.dumps(pod))
    kubectl_ok(cluster, "patch", "pod", "reactor-operator", "-n", namespace, "--subresource=status", "--type=merge",
               "-p", json.dumps({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}))
    kubectl_ok(cluster, "apply", "-n", namespace, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "reactor"},
         "spec": {"ports": [{"name": "web", "port": 8081, "targetPort": port}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "reactor-web", "labels": {"kubernetes.io/service-name": "reactor"}},
         "addressType": "IPv4", "ports": [{"name": "web", "port": port, "protocol": "TCP"}],
         "endpoints": [{"addresses": [ip], "conditions": {"ready": True},
                        "targetRef": {"kind": "Pod", "name": "reactor-operator", "namespace": namespace}}]},
    ]}))
    kubectl_ok(cluster, "create", "secret", "generic", "team-keys", "-n", namespace, f"--from-literal=TEAM_TOKEN={SECRET}")
    args = ("--web", f"{ip}:{port}", "--progress-interval", "0.5s", "--max-agents", "4", "--port-range", port_range("19500-19700"))
    with operators(cluster, namespace, work_dir) as start:
        yield {"cluster": cluster, "namespace": namespace, "start": start, "args": args,
               "operator": start(*args), "url": f"http://{ip}:{port}", "work_dir": work_dir}
    leaked = find_marked_processes(str(work_dir.resolve()))
    for proc in leaked:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not leaked, f"servers left running: {leaked}"


@pytest.fixture(scope="module")
def prometheus(observed, tmp_path_factory):
    """Debian's Prometheus scraping the operator every second (its counters hold what the
    tasks did, whether it scraped during their run or after)."""
    root = tmp_path_factory.mktemp("prometheus")
    target = observed["url"].removeprefix("http://")
    (root / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "reactor", "static_configs": [{"targets": [target]}]}],
    }))
    port = free_port()
    log = open(root / "prometheus.log", "wb")
    process = subprocess.Popen(
        ["prometheus", f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (root / "prometheus.log").read_text()
            try:
                if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus not ready in 60s"
            time.sleep(0.1)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def two_tasks(observed, tmp_path_factory):
    """Two tasks at once: `obs-live` (its first tool call held until released, with a
    Secret in its environment) and `obs-budget` (a runaway agent with maxTokens 100000)."""
    cluster, namespace, op = observed["cluster"], observed["namespace"], observed["operator"]
    repo = make_repo(tmp_path_factory.mktemp("observe-repo") / "app")
    live = Scenario("obs-live:", [bash(WAIT), bash("echo token=$TEAM_TOKEN"), FIX, text("Fixed add().")])
    with ScriptedModel([live, runaway("obs-budget:")]) as model:
        live_task = agent_task("obs-live", repo, model, timeout="3m", agent={
            "config": model.opencode_config(), "envFrom": [{"secretRef": {"name": "team-keys"}}]})
        budget_task = agent_task("obs-budget", repo, model, timeout="3m", budget={"maxTokens": 100000})
        for task in (live_task, budget_task):
            kubectl_ok(cluster, "apply", "-n", namespace, "-f", "-", input=json.dumps(task))

        mid = op.wait_for("obs-live", lambda o: ((o or {}).get("status", {}).get("progress") or {})
                          .get("activity", "").startswith("bash: until"), timeout=120, what="the bash tool in progress")
        wide = kubectl_ok(cluster, "get", "agenttasks", "-n", namespace, "-o", "wide")
        final_answer_asked = [r for r in model.requests if r["scenario"] == "obs-live:" and r["answer"] == "text"]
        follower = LogsFollower(cluster, namespace, "obs-live", "-f")
        follower.wait_for("-> bash")
        Path(mid["status"]["cell"]["worktree"], ".release").write_text("")
        done = {name: op.wait_terminal(name, timeout=180) for name in ("obs-live", "obs-budget")}
        followed = follower.finish()
    replay = LogsFollower(cluster, namespace, "obs-live").finish()
    return {"mid": mid, "wide": wide, "final_answer_asked": final_answer_asked, "done": done, "followed": followed,
            "replay": replay, "repo": repo, "model_requests": model.requests, **observed}


# --------------------------------------------------------------------------------- tests


def test_progress_shows_the_running_tool_before_the_turn_ends(two_tasks):
    progress = two_tasks["mid"]["status"]["progress"]
    assert two_tasks["mid"]["status"]["phase"] == "Executing"
    assert progress["tool"] == "bash" and progress["activity"].startswith("bash: until [ -e .release ]")
    assert progress["toolCalls"] == 1 and progress["lastActivityTime"]
    assert two_tasks["final_answer_asked"] == [], "the turn had not ended"
    header, *rows = two_tasks["wide"].splitlines()
    assert "ACTIVITY" in header and "COST" in header and "TOKENS" in header
    live_row = next(row for row in rows if row.startswith("obs-live"))
    assert "bash: until" in live_row and "$" in live_row

    live = two_tasks["done"]["obs-live"]["status"]
    assert live["phase"] == "Succeeded", live
    final = live["progress"]
    assert final["steps"] == 4 and final["toolCalls"] == 3 and final["filesTouched"] == ["calc.py"]
    assert final["costDisplay"] == live["usage"]["costDisplay"] and final["activity"] == ""
    table = kubectl_ok(two_tasks["cluster"], "get", "agenttasks", "-n", two_tasks["namespace"])
    assert live["usage"]["costDisplay"] in next(r for r in table.splitlines() if r.startswith("obs-live"))
    events = two_tasks["operator"].events("obs-live")
    assert any(e["reason"] == "AgentEditing" and "calc.py" in e["message"] for e in events), events
    assert SECRET not in json.dumps(two_tasks["done"]["obs-live"]) + json.dumps(events)


def test_a_task_crossing_max_tokens_is_stopped_reverted_and_not_pushed(two_tasks):
    obj = two_tasks["done"]["obs-budget"]
    status = obj["status"]
    assert status["phase"] == "Failed" and condition(obj)["reason"] == "BudgetExceeded", status
    assert "tokens > maxTokens 100000" in status["message"] and "spent $" in status["message"]
    assert status["result"]["pushed"] is False and status["result"].get("commit") is None
    assert git(two_tasks["repo"], "branch", "--list", "reactor/obs-budget") == "", "nothing pushed"
    steps = [r for r in two_tasks["model_requests"] if r["scenario"] == "obs-budget:" and r["answer"] != "text"]
    assert len(steps) <= 4, "stopped within one model step of crossing (at step 3)"
    used = status["usage"]["inputTokens"] + status["usage"]["outputTokens"]
    print(f"\nbudget overshoot in the operator: {used - 100000} tokens past maxTokens 100000 ({len(steps)} model answers)")
    reasons = [e["reason"] for e in two_tasks["operator"].events("obs-budget")]
    assert "BudgetWarning" in reasons and "Failed" in reasons, reasons


def test_reactor_logs_follows_a_running_task_and_replays_it_after(two_tasks):
    followed, replay = two_tasks["followed"], two_tasks["replay"]
    assert followed == replay, "the live stream and the replay show the same transcript"
    assert "== Executing" in followed and ">> prompt: obs-live: fix add()" in followed
    assert "-> bash" in followed and "until [ -e .release ]" in followed and "released" in followed
    assert "token=***" in followed and SECRET not in followed
    assert "-> edit" in followed and "== Succeeded" in followed
    assert followed.rstrip().splitlines()[-1].split(" ", 1)[1].startswith("== end: committed (Committed)")


def test_reactor_logs_names_an_unknown_task(two_tasks):
    out = subprocess.run([sys.executable, "-m", "reactor.cli", "logs", "no-such-task", "-n", two_tasks["namespace"],
                          "--kubeconfig", str(two_tasks["cluster"].kubeconfig_path),
                          "--operator-service", f"{two_tasks['namespace']}/reactor:web"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and f"no task {two_tasks['namespace']}/no-such-task" in out.stderr, out.stderr


def promql(prometheus: str, query: str) -> float | None:
    data = httpx.get(prometheus + "/api/v1/query", params={"query": query}, timeout=5).json()
    assert data["status"] == "success", data
    result = data["data"]["result"]
    return float(result[0]["value"][1]) if result else None


@pytest.mark.needs("prometheus")
def test_prometheus_scrapes_what_the_tasks_did(two_tasks, prometheus):
    ns = two_tasks["namespace"]
    done = two_tasks["done"]
    tokens = sum(sum(done[n]["status"]["usage"][k] for k in ("inputTokens", "outputTokens", "reasoningTokens",
                                                               "cacheReadTokens", "cacheWriteTokens")) for n in done)
    cost = sum(done[n]["status"]["usage"]["cost"] for n in done)
    expected = {
        f'sum(reactor_tasks_finished_total{{namespace="{ns}"}})': 2,
        f'sum(reactor_task_failures_total{{namespace="{ns}",reason="BudgetExceeded"}})': 1,
        f'sum(reactor_tasks{{namespace="{ns}",phase="Succeeded"}})': 1,
        f'sum(reactor_task_duration_seconds_count{{namespace="{ns}"}})': 2,
        f'sum(reactor_tool_calls_total{{namespace="{ns}",tool="bash"}})': 2,
        f'sum(reactor_tokens_total{{namespace="{ns}"}})': tokens,
        "reactor_cells_capacity": 4,
        "reactor_cells_busy": 0,
    }
    deadline = time.monotonic() + 60
    while True:  # Prometheus scrapes every second: wait for a scrape after the tasks ended
        answers = {query: promql(prometheus, query) for query in expected}
        if answers == {q: float(v) for q, v in expected.items()} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert answers == {q: float(v) for q, v in expected.items()}
    assert promql(prometheus, f'sum(reactor_cost_dollars_total{{namespace="{ns}"}})') == pytest.approx(cost, rel=1e-6)
    assert promql(prometheus, 'count(reactor_phase_duration_seconds_count{phase="Executing"})') == 1
    patches = promql(prometheus, "sum(reactor_status_patches_total)")
    progress = promql(prometheus, 'sum(reactor_status_patches_total{kind="progress"})')
    print(f"\nstatus patches: {patches / 2:.1f} per task ({progress / 2:.1f} of them progress-only)")


def _pixels_near(image, box, rgb, tolerance: int = 12) -> int:
    left, top = int(box["x"]), int(box["y"])
    right, bottom = int(box["x"] + box["width"]), int(box["y"] + box["height"])
    count = 0
    for x in range(left, right):
        for y in range(top, bottom):
            r, g, b = image.getpixel((x, y))[:3]
            if abs(r - rgb[0]) <= tolerance and abs(g - rgb[1]) <= tolerance and abs(b - rgb[2]) <= tolerance:
                count += 1
    return count


@pytest.mark.needs("chromium")
def test_the_fleet_page_in_headless_chromium(two_tasks, tmp_path):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    ns = two_tasks["namespace"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1100})
            page.goto(two_tasks["url"] + "/")
            page.wait_for_selector('tr[data-task="%s/obs-budget"]' % ns)
            rows = {r.get_attribute("data-task"): r.inner_text() for r in page.query_selector_all("#tasks tbody tr")}
            assert "Succeeded" in rows[f"{ns}/obs-live"] and "$" in rows[f"{ns}/obs-live"]
            assert "Failed" in rows[f"{ns}/obs-budget"] and "BudgetExceeded" in rows[f"{ns}/obs-budget"]
            assert ns in page.inner_text("#spend")
            list_shot = tmp_path / "fleet.png"
            page.screenshot(path=str(list_shot))

            page.click('tr[data-task="%s/obs-live"]' % ns)
            page.wait_for_selector('#transcript[data-complete="true"]')
            page.wait_for_selector('#timeline rect[data-phase="Succeeded"]')
            phases = [r.get_attribute("data-phase") for r in page.query_selector_all("#timeline rect")]
            assert phases == ["Bootstrapping", "Executing", "Testing", "Committing", "Pushing", "TearingDown", "Succeeded"]
            transcript = page.inner_text("#transcript")
            assert "-> bash" in transcript and "token=***" in transcript
            assert page.inner_text("#files") == "calc.py"
            timeline_box = page.locator("#timeline").bounding_box()
            badge_box = page.locator('tr[data-task="%s/obs-budget"] .phase' % ns).bounding_box()
            detail_shot = tmp_path / "detail.png"
            page.screenshot(path=str(detail_shot), full_page=True)
            html = page.content()
        finally:
            browser.close()

    assert SECRET not in html, "no secret on the page"
    image = Image.open(detail_shot).convert("RGB")
    # The timeline is drawn: each phase's bar in its colour, inside the timeline's box.
    for phase in ("Executing", "Testing", "Succeeded"):
        assert _pixels_near(image, timeline_box, PHASE_RGB[phase]) > 50, f"no {phase} bar drawn in the timeline"
    assert _pixels_near(image, badge_box, PHASE_RGB["Failed"]) > 50, "the Failed badge is drawn"
    listed = Image.open(list_shot).convert("RGB")
    assert _pixels_near(listed, badge_box, PHASE_RGB["Failed"]) > 50


def test_a_namespace_spend_limit_stops_a_running_task_and_holds_new_ones_across_a_restart(two_tasks):
    """Runs last: it restarts the module's operator."""
    cluster, ns, op = two_tasks["cluster"], two_tasks["namespace"], two_tasks["operator"]
    repo = two_tasks["repo"]
    limit = {"apiVersion": "reactor.dev/v1alpha1", "kind": "SpendLimit", "metadata": {"name": "team-cap"},
             "spec": {"period": "Total", "maxTokens": 100000}}
    kubectl_ok(cluster, "apply", "-n", ns, "-f", "-", input=json.dumps(limit))

    def spend_limit() -> dict:
        return json.loads(kubectl_ok(cluster, "get", "spendlimit", "team-cap", "-n", ns, "-o", "json"))

    with ScriptedModel([runaway("cap-hog:"), Scenario("cap-new:", [FIX, text("Fixed.")])]) as model:
        kubectl_ok(cluster, "apply", "-n", ns, "-f", "-", input=json.dumps(agent_task("cap-hog", repo, model, timeout="3m")))
        hog = op.wait_terminal("cap-hog", timeout=180)
        assert condition(hog)["reason"] == "SpendLimitExceeded", hog["status"]
        assert "namespace spend limit team-cap reached" in hog["status"]["message"]
        assert git(repo, "branch", "--list", "reactor/cap-hog") == ""

        kubectl_ok(cluster, "apply", "-n", ns, "-f", "-", input=json.dumps(agent_task("cap-new", repo, model, timeout="3m")))
        held = op.wait_for("cap-new", lambda o: o and o.get("status", {}).get("phase") == "Pending"
                           and condition(o)["reason"] == "SpendLimitExceeded", what="held by the spend limit")
        assert "team-cap" in held["status"]["message"]
        # The crossing is written at once (not after the 2 s rate limit): seen within moments.
        before = wait_for(lambda: (lambda st: st if st.get("exceeded") else None)(spend_limit().get("status") or {}),
                          10, "the SpendLimit's status says exceeded", lambda: json.dumps(spend_limit()), interval=0.2)
        assert before["exceeded"] is True and before["spentTokens"] > 100000, before

        # Restart: the spend is still there, and the new task is still held.
        op.stop()
        op = two_tasks["start"](*two_tasks["args"])
        deadline = time.monotonic() + 60
        while sum(e["reason"] == "SpendLimitExceeded" for e in op.events("cap-new")) < 2:
            assert time.monotonic() < deadline, f"the restarted operator did not hold cap-new:\n{op.log()}"
            time.sleep(0.2)
        after = spend_limit()["status"]
        assert after["spentTokens"] == before["spentTokens"] and after["exceeded"] is True
        assert op.get("cap-new")["status"]["phase"] == "Pending"
        table = kubectl_ok(cluster, "get", "spendlimits", "-n", ns)
        assert "true" in table and str(before["spentTokens"]) in table

        # Raising the limit lets it run.
        kubectl_ok(cluster, "patch", "spendlimit", "team-cap", "-n", ns, "--type=merge",
                   "-p", json.dumps({"spec": {"maxTokens": 10_000_000}}))
        done = op.wait_terminal("cap-new", timeout=180)
    assert done["status"]["phase"] == "Succeeded", done["status"]

    # A deleted task's transcript goes with it.
    transcript = two_tasks["work_dir"] / "transcripts" / ns / "cap-new.jsonl"
    assert transcript.exists()
    kubectl_ok(cluster, "delete", "agenttask", "cap-new", "-n", ns, "--timeout=60s")
    assert not transcript.exists()
    gone = LogsFollower(cluster, ns, "cap-new")
    assert gone.finish() == "" and gone.process.returncode == 1
