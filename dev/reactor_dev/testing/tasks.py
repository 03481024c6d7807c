"""AgentTasks for tests, benchmarks and the demo: the one manifest builder, reading a task's
conditions, and kubectl calls that must succeed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

API_VERSION = "reactor.dev/v1alpha1"
TERMINAL = ("Succeeded", "Failed")


def agent_task(name: str, repo: str | Path = "file:///srv/repos/app", model: Any = None, *,
               namespace: str | None = None, **spec: Any) -> dict:
    """An AgentTask that fixes add() in calc.py of reactor_dev.testing.repos' default
    repository. ``repo``: its URL, or a local path (file://). ``model``: a ScriptedModel
    (or an OpenCode config dict) for ``spec.agent.config``. Each keyword in ``spec`` replaces
    that field of the spec whole (``test={}`` really leaves ``test`` empty)."""
    url = repo if isinstance(repo, str) else f"file://{Path(repo)}"
    body: dict[str, Any] = {
        "description": "Fix add",
        "prompt": f"{name}: fix add() in calc.py so the tests pass",
        "repository": {"url": url, "branch": "main"},
        "test": {"command": "python3 -m pytest -q"},
    }
    if model is not None:
        body["agent"] = {"config": model if isinstance(model, dict) else model.opencode_config()}
    body.update(spec)
    metadata = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": API_VERSION, "kind": "AgentTask", "metadata": metadata, "spec": body}


def condition(obj: dict, type_: str = "Succeeded") -> dict:
    """The task's condition of that type (``Succeeded``: the verdict; ``Confined``)."""
    return next(c for c in obj["status"]["conditions"] if c["type"] == type_)


def reason(obj: dict) -> str:
    return condition(obj)["reason"]


def phase(obj: dict | None) -> str | None:
    return ((obj or {}).get("status") or {}).get("phase")


def terminal(obj: dict | None) -> bool:
    return phase(obj) in TERMINAL


def ok(out) -> str:
    """The stdout of a finished kubectl (CompletedProcess); its stderr in the failure."""
    assert out.returncode == 0, f"kubectl failed ({out.returncode}):\n{out.stderr}\n{out.stdout}"
    return out.stdout


def kubectl_ok(cluster, *args: str, input: str | None = None, timeout: float = 120) -> str:
    """``cluster.kubectl(*args)`` that must succeed; its stdout."""
    out = cluster.kubectl(*args, input=input, timeout=timeout)
    assert out.returncode == 0, f"kubectl {' '.join(args)} failed ({out.returncode}):\n{out.stderr}\n{out.stdout}"
    return out.stdout


def kubectl_apply(cluster, namespace: str, obj: dict, *extra: str):
    """`kubectl apply -n NAMESPACE -f -` of one object; the CompletedProcess (tests of refusals look at it)."""
    return cluster.kubectl("apply", "-n", namespace, *extra, "-f", "-", input=json.dumps(obj))


def apply_secret(cluster, namespace: str, name: str, data: dict[str, str]) -> None:
    """A Secret holding ``data`` (given in clear, stored base64) in ``namespace``."""
    import base64

    manifest = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
    kubectl_ok(cluster, "apply", "-f", "-", input=json.dumps(manifest))
