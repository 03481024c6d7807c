"""Helpers for runs of several operator replicas (tests and bench/fleet_throughput.py): start
replicas with their own work dirs, apply many tasks at once, read back who ran what from the
scripted model's own log, and kill a replica the way a node failure does."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reactor.infra.processes import find_marked_processes
from reactor_dev.testing.helpers import wait_for
from reactor_dev.testing.workers import port_range
from reactor_dev.testing.tasks import agent_task


def fleet_args(index: int, namespace: str, lease_duration: float, *extra: str) -> tuple[str, ...]:
    """`reactor operator` flags for replica r<index>: its own port range (replicas of one
    machine), and a generous health timeout: several replicas start servers at once on few
    cores, and these runs are about coordination, not start-up speed."""
    first = 18500 + 100 * index
    return ("--fleet", f"--replica-id=r{index}", f"--lease-namespace={namespace}",
            f"--lease-duration={lease_duration:g}s", f"--port-range={port_range(f'{first}-{first + 100}')}",
            "--health-timeout=90s", *extra)


def fix_task(name: str, origin: Path, model_config: dict, timeout: str = "5m") -> dict:
    """An AgentTask fixing calc.py of reactor_dev.testing.repos' default repository."""
    return agent_task(name, Path(origin), model_config, resultBranch=f"reactor/{name}", timeout=timeout)


def apply_all(cluster, namespace: str, objects: list[dict]) -> None:
    """One `kubectl apply` for all of them (a List), as a user applying a folder would."""
    out = cluster.kubectl("apply", "-n", namespace, "-f", "-",
                          input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    if out.returncode != 0:
        raise RuntimeError(f"kubectl apply failed: {out.stderr}")


def tasks(cluster, namespace: str) -> dict[str, dict]:
    out = cluster.kubectl("get", "-n", namespace, "agenttasks", "-o", "json")
    return {o["metadata"]["name"]: o for o in json.loads(out.stdout)["items"]}


def all_terminal(cluster, namespace: str, count: int) -> dict[str, dict] | None:
    objs = tasks(cluster, namespace)
    done = [o for o in objs.values() if (o.get("status") or {}).get("phase") in ("Succeeded", "Failed")]
    return objs if len(done) == count else None


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, log: Callable[[], str] = lambda: "") -> Any:
    """``wait_for`` at a pace fit for predicates that ask the API server (kubectl)."""
    return wait_for(predicate, timeout, what, log, interval=0.2)


def conversations(requests: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per task (scenario): each cell (its working directory) that talked to the model, from
    its first request to its last answer. A cell's directory lies in its replica's work dir."""
    spans: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for request in requests:
        if not request.get("scenario") or not request.get("workdir"):
            continue
        task = request["scenario"].rstrip(":")
        start, end = request["time"], request.get("answered", time.time())
        span = spans[task].setdefault(request["workdir"], [start, end])
        span[0], span[1] = min(span[0], start), max(span[1], end)
    return {task: {cell: (s, e) for cell, (s, e) in cells.items()} for task, cells in spans.items()}


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals overlapping at one instant."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    most = current = 0
    for _, delta in edges:
        current += delta
        most = max(most, current)
    return most


def kill_pod(replica) -> None:
    """What a node failure or `kubectl delete pod --force` does to a replica (an
    OperatorProcess): the operator and every process of its pod die at once."""
    cells = find_marked_processes(str(Path(replica.work_dir).resolve()))
    os.killpg(replica.process.pid, signal.SIGKILL)
    for process in cells:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    replica.process.wait()


class BranchPushHold:
    """Hooks in a test origin (a repository of ``reactor_dev.testing.repos``) that hold a push
    of a branch where a replica can be killed: ``hold(branch)`` before the branch moves (in
    pre-receive; declined once released, so the push lands nowhere), ``hold(branch,
    landed=True)`` after it moved (in post-receive: the push landed, the pusher has not heard
    yet). ``arrived(branch)`` says the push is there. Pushes of other refs (Reactor's
    refs/reactor/*) pass at once."""

    def __init__(self, origin: Path):
        self.dir = Path(origin) / ".git" if (Path(origin) / ".git").is_dir() else Path(origin)
        for hook, stage, after_release in (("pre-receive", "before", 'echo "held push declined" >&2; exit 1'),
                                           ("post-receive", "after", "")):
            path = self.dir / "hooks" / hook
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"""#!/bin/sh
while read old new ref; do
    case "$ref" in refs/heads/*) ;; *) continue ;; esac
    name=$(printf '%s' "${{ref#refs/heads/}}" | tr / _)
    if [ -e "{self.dir}/{stage}-$name" ]; then
        touch "{self.dir}/arrived-$name"
        while [ -e "{self.dir}/{stage}-$name" ]; do sleep 0.05; done
        {after_release}
    fi
done
""")
            path.chmod(0o755)

    def _flag(self, prefix: str, branch: str) -> Path:
        return self.dir / f"{prefix}-{branch.replace('/', '_')}"

    def hold(self, branch: str, landed: bool = False) -> None:
        self._flag("after" if landed else "before", branch).touch()

    def arrived(self, branch: str) -> bool:
        return self._flag("arrived", branch).exists()

    def release(self, branch: str) -> None:
        for stage in ("before", "after"):
            self._flag(stage, branch).unlink(missing_ok=True)


def first_prompt(request: dict) -> str:
    """The first user message of a logged model request (the task's prompt, as the cell's
    session got it)."""
    for message in (request.get("body") or {}).get("messages") or []:
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content or "")
    return ""
