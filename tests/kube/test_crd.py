"""The AgentTask schema as the real API server enforces it."""

import json

import pytest

from reactor_dev.testing.tasks import agent_task, kubectl_apply


def test_a_valid_task_is_accepted_with_defaults(crd_installed, namespace):
    out = kubectl_apply(crd_installed, namespace, agent_task("ok"))
    assert out.returncode == 0, out.stderr
    got = json.loads(crd_installed.kubectl("get", "-n", namespace, "agenttask", "ok", "-o", "json").stdout)
    assert got["spec"]["repository"]["push"] is True
    assert got["spec"]["timeout"] == "30m" and got["spec"]["test"]["timeout"] == "10m"
    # short name and category work as users expect
    assert crd_installed.kubectl("get", "-n", namespace, "at", "ok").returncode == 0
    assert "ok" in crd_installed.kubectl("get", "-n", namespace, "reactor").stdout


@pytest.mark.parametrize(
    ("overrides", "field", "why"),
    [
        ({"prompt": ""}, "spec.prompt", "at least 1 chars"),
        ({"prompt": "   "}, "spec.prompt", "must not be blank"),
        ({"repository": {"url": "ftp://example.com/r.git"}}, "spec.repository.url", "https://, ssh:// or file://"),
        ({"repository": {"url": "file:///r", "branch": "feature..x"}}, "spec.repository.branch", "valid git branch name"),
        ({"resultBranch": "bad branch"}, "spec.resultBranch", "valid git branch name"),
        ({"resultBranch": "reactor/x.lock"}, "spec.resultBranch", "valid git branch name"),
        ({"timeout": "thirty minutes"}, "spec.timeout", "must be a duration such as"),
        ({"test": {"command": "pytest", "timeout": "10 m"}}, "spec.test.timeout", "must be a duration such as"),
        ({"agent": {"model": "claude-sonnet"}}, "spec.agent.model", "must be provider/model"),
        ({"taskId": "-x"}, "spec.taskId", "should match"),
        ({"test": {}}, "spec.test.command", "Required value"),
        ({"repository": {"url": "http://example.com/a/b.git"}}, "spec.repository.url", "http:// only to 127.0.0.1"),
        ({"result": {"kind": "pullRequest"}}, "spec.result.kind pullRequest", "not file://"),
        ({"repository": {"url": "https://example.com/a/b.git"}, "result": {"kind": "branch", "draft": True}},
         "spec.result.draft", "apply only to spec.result.kind pullRequest"),
        ({"result": {"kind": "pr"}}, "spec.result.kind", "Unsupported value"),
        ({"dependsOn": ["Add_API"]}, "spec.dependsOn[0]", "must be the name of an AgentTask"),
        ({"dependsOn": ["a", "a"]}, "spec.dependsOn[1]", "Duplicate value"),
        ({"dependsOn": ["bad"]}, "spec.dependsOn", "must not name the task itself"),
    ],
)
def test_invalid_specs_are_rejected_naming_the_field(crd_installed, namespace, overrides, field, why):
    out = kubectl_apply(crd_installed, namespace, agent_task("bad", **overrides))
    assert out.returncode != 0
    assert field in out.stderr and why in out.stderr, out.stderr
    assert crd_installed.kubectl("get", "-n", namespace, "agenttask", "bad").returncode != 0, "nothing was stored"


def test_a_url_carrying_credentials_is_refused_pointing_at_the_secret_ref(crd_installed, namespace):
    for url in ("https://ci-bot:ghp_S3cr3tT0ken@github.com/example/app.git", "https://ghp_S3cr3tT0ken@github.com/e/a.git",
                "ssh://git:ghp_S3cr3tT0ken@github.com/example/app.git"):
        out = kubectl_apply(crd_installed, namespace, agent_task("creds", url))
        assert out.returncode != 0, url
        assert "spec.repository.url" in out.stderr and "spec.repository.credentialsSecretRef" in out.stderr, out.stderr
        assert "S3cr3t" not in out.stderr, "the refusal repeats the token"
    ssh_user = kubectl_apply(crd_installed, namespace, agent_task("ssh-user", "ssh://git@github.com/e/a.git"))
    assert ssh_user.returncode == 0, ssh_user.stderr
    # A MergeQueue names the same repository by the same rules (its tasks' URL must fit it).
    queue = {"apiVersion": "reactor.dev/v1alpha1", "kind": "MergeQueue", "metadata": {"name": "creds"},
             "spec": {"repository": {"url": "https://ghp_S3cr3tT0ken@github.com/e/a.git"}}}
    out = kubectl_apply(crd_installed, namespace, queue)
    assert out.returncode != 0 and "credentialsSecretRef" in out.stderr and "S3cr3t" not in out.stderr, out.stderr
    queue["spec"]["repository"]["url"] = "http://127.0.0.1:3000/team/app.git"  # a forge on the operator's machine
    assert kubectl_apply(crd_installed, namespace, queue).returncode == 0


def test_spec_is_immutable_and_reapplying_the_same_manifest_changes_nothing(crd_installed, namespace):
    task = agent_task("frozen")
    assert kubectl_apply(crd_installed, namespace, task).returncode == 0
    before = json.loads(crd_installed.kubectl("get", "-n", namespace, "at", "frozen", "-o", "json").stdout)
    again = kubectl_apply(crd_installed, namespace, task)
    assert again.returncode == 0 and "unchanged" in again.stdout
    after = json.loads(crd_installed.kubectl("get", "-n", namespace, "at", "frozen", "-o", "json").stdout)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]

    changed = agent_task("frozen", prompt="Something else")
    out = kubectl_apply(crd_installed, namespace, changed)
    assert out.returncode != 0
    assert "spec is immutable: create a new AgentTask" in out.stderr, out.stderr


def test_printer_columns(crd_installed, namespace):
    assert kubectl_apply(crd_installed, namespace, agent_task("cols", dependsOn=["add-api"])).returncode == 0
    status = {"status": {"phase": "Succeeded", "result": {"outcome": "committed", "shortCommit": "abc1234"},
                         "usage": {"cost": 0.0123, "costDisplay": "$0.0123"}, "cell": {"port": 8001},
                         "progress": {"costDisplay": "$0.0123", "activity": "idle", "totalTokens": 900},
                         "waitingOn": "add-api",
                         "conditions": [{"type": "Succeeded", "status": "True", "reason": "Committed"}]}}
    patched = crd_installed.kubectl("patch", "-n", namespace, "at", "cols", "--subresource=status", "--type=merge",
                                    "-p", json.dumps(status))
    assert patched.returncode == 0, patched.stderr
    table = crd_installed.kubectl("get", "-n", namespace, "agenttasks").stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "RESULT", "COMMIT", "COST", "WAITING-ON", "AGE"]
    assert table[1].split()[:6] == ["cols", "Succeeded", "committed", "abc1234", "$0.0123", "add-api"]
    wide = crd_installed.kubectl("get", "-n", namespace, "agenttasks", "-o", "wide").stdout.splitlines()
    assert wide[0].split() == ["NAME", "PHASE", "RESULT", "COMMIT", "COST", "WAITING-ON", "AGE", "ACTIVITY", "TOKENS",
                               "PORT", "REASON", "REPLICA", "CLAIMED", "PR", "DEPENDS-ON"]
    # Who it builds on stays visible once it no longer waits (-o wide).
    assert wide[1].split()[-5:] == ["idle", "900", "8001", "Committed", '["add-api"]']
