"""Green-to-PR figures: the operator opening pull requests on a real Gitea.

  - green-to-PR latency: from the moment a task's tests have passed (its status leaves
    Testing for Committing) to the moment its status records the pull request, p50/p95;
  - forge API requests per task (the operator's reactor_forge_requests_total / tasks);
  - the Gitea test session: start time and memory.

N tasks (default 20) on one repository, each with its own result branch and PR, 4 cells at
once. The status is read with one list call every 0.1 s (so latencies are +-0.1 s).

    python bench/pr_latency.py [--tasks 20] [--max-agents 4]
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import kubernetes

from reactor_dev.devcluster.controlplane import ControlPlane
from reactor_dev.testing.forge import GiteaServer
from reactor_dev.testing.helpers import install_crds
from reactor_dev.testing.operator_process import OperatorProcess
from reactor_dev.testing.repos import make_repo
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, text

GREEN = ("Committing", "Pushing", "TearingDown", "Succeeded")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--max-agents", type=int, default=4)
    args = parser.parse_args()
    names = [f"pr-{i:02d}" for i in range(args.tasks)]
    with tempfile.TemporaryDirectory(prefix="reactor-bench-pr-") as tmp_text, ControlPlane() as cluster:
        tmp = Path(tmp_text)
        install_crds(cluster)
        cluster.kubectl("create", "namespace", "bench")
        with GiteaServer(tmp / "gitea") as gitea:
            print(f"gitea: start {gitea.start_seconds:.2f}s, rss {gitea.rss_bytes() / 2**20:.0f} MiB")
            url = gitea.create_repository("app", make_repo(tmp / "app"))
            for name, data in (("git-creds", {"username": "reactor", "password": gitea.password}),
                               ("forge-token", {"token": gitea.token})):
                secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "bench"},
                          "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
                cluster.kubectl("apply", "-f", "-", input=json.dumps(secret))
            script = [Scenario(f"{n}:", [edit("calc.py", "return a - b", "return a + b"), text("Fixed.")]) for n in names]
            web = f"127.0.0.1:{_free()}"
            with ScriptedModel(script) as model:
                op = OperatorProcess(cluster, "bench", tmp / "work", "--max-agents", str(args.max_agents),
                                     "--forge-token-secret", "forge-token", "--forge-host", urlsplit(url).netloc,
                                     "--web", web)
                (tmp / "work").mkdir()
                op.start()
                try:
                    api = kubernetes.client.CustomObjectsApi(
                        kubernetes.config.new_client_from_config(str(cluster.kubeconfig_path)))
                    for name in names:
                        manifest = {"apiVersion": "reactor.dev/v1alpha1", "kind": "AgentTask",
                                    "metadata": {"name": name},
                                    "spec": {"prompt": f"{name}: fix add", "description": "Fix add",
                                             "repository": {"url": url, "credentialsSecretRef": {"name": "git-creds"}},
                                             "test": {"command": "python3 -m pytest -q"},
                                             "agent": {"config": model.opencode_config()}, "timeout": "10m",
                                             "result": {"kind": "pullRequest", "forge": "gitea"}}}
                        cluster.kubectl("create", "-n", "bench", "-f", "-", input=json.dumps(manifest))
                    green: dict[str, float] = {}
                    verdict: dict[str, float] = {}
                    opened: dict[str, float] = {}
                    deadline = time.monotonic() + 60 * args.tasks
                    while len(opened) < len(names) and time.monotonic() < deadline:
                        now = time.monotonic()
                        items = api.list_namespaced_custom_object("reactor.dev", "v1alpha1", "bench", "agenttasks")
                        for item in items["items"]:
                            name, status = item["metadata"]["name"], item.get("status") or {}
                            if status.get("phase") == "Failed":
                                raise SystemExit(f"{name} failed: {status.get('message')}")
                            if name not in green and status.get("phase") in GREEN:
                                green[name] = now
                            if name not in verdict and status.get("phase") == "Succeeded":
                                verdict[name] = now
                            if name not in opened and (status.get("pullRequest") or {}).get("url"):
                                opened[name] = now
                            refused = [c for c in status.get("conditions") or []
                                       if c.get("type") == "PullRequestOpened" and c.get("reason") == "ForgeRefused"]
                            if refused:
                                raise SystemExit(f"{name}: {refused[0]['message']}")
                        time.sleep(0.1)
                    metrics = httpx.get(f"http://{web}/metrics", timeout=10).text
                finally:
                    op.stop()
            latencies = [opened[n] - green[n] for n in names if n in opened and n in green]
            forge_part = [opened[n] - verdict[n] for n in names if n in opened and n in verdict]
            requests = sum(float(v) for v in re.findall(r'^reactor_forge_requests_total\{[^}]*\} (\S+)', metrics, re.M))
            pulls = gitea.pull_requests("app")
            print(f"tasks {len(names)}, PRs on the forge {len(pulls)}, PRs recorded {len(opened)}")
            print(f"green-to-PR: p50 {statistics.median(latencies):.2f}s, p95 {percentile(latencies, 0.95):.2f}s, "
                  f"max {max(latencies):.2f}s (green = status past Testing; includes commit, push, teardown)")
            print(f"Succeeded-to-PR (the forge's part): p50 {statistics.median(forge_part):.2f}s, "
                  f"p95 {percentile(forge_part, 0.95):.2f}s")
            print(f"forge API requests: {requests:.0f} in all, {requests / len(names):.1f} per task")
            print(f"gitea after the run: rss {gitea.rss_bytes() / 2**20:.0f} MiB")


def _free() -> int:
    from reactor_dev.testing.helpers import free_port

    return free_port()


if __name__ == "__main__":
    main()
