"""Ways in found by the fourth adversarial review (the launcher's deadline, reattaching,
the log follower, pull requests, the merge queue's credentials), each turned into a test at
the cheapest level that proves it."""

from __future__ import annotations

import asyncio

import pytest

from reactor.errors import ConfigurationError

FORGE_TOKEN = "forge-token"  # the operator's --forge-token-secret, a Secret in each tenant namespace


async def test_a_merge_queue_cannot_hand_the_operators_forge_token_to_its_own_host():
    """The second review kept the operator's forge token out of a task's envFrom and
    credentialsSecretRef; a MergeQueue's spec.repository.credentialsSecretRef still named it:
    the queue's git (fetch of the base, push of an advance) got it as its password for
    whatever host the queue's author wrote in spec.repository.url. Refused before it is read."""
    from kubernetes import client as k8s

    from reactor.kube.mergequeues import MergeQueues, _Driver
    from reactor.kube.resource import MergeQueueSpec

    queues = MergeQueues(k8s.ApiClient(), None, None, operator_secrets=(FORGE_TOKEN,))
    read_from: list[str] = []

    async def read(namespace, name, field_path):
        read_from.append(name)
        return {"username": "x", "password": "the-operators-t0ken"}

    queues.secrets.read = read
    driver = _Driver(queues, "team-a", "main")
    spec = MergeQueueSpec.model_validate({"repository": {"url": "https://attacker.example/o/r.git",
                                                         "credentialsSecretRef": {"name": FORGE_TOKEN}}})
    with pytest.raises(ConfigurationError, match="credentialsSecretRef.*--forge-token-secret"):
        await driver._credentials(spec)
    assert read_from == []
    own = MergeQueueSpec.model_validate({"repository": {"url": "https://attacker.example/o/r.git",
                                                        "credentialsSecretRef": {"name": "git-creds"}}})
    assert (await driver._credentials(own)).password == "the-operators-t0ken"  # its own Secret: read
    assert read_from == ["git-creds"]


class _GarbageForge:
    """A tenant's own forge (spec.result.tokenSecretRef may name any host) answering every
    request 200 with something that is not JSON (an HTML page). Counts the requests."""

    def __init__(self, answer: bytes = b"<html>not an API</html>") -> None:
        import socket
        import threading

        self.answer, self.requests = answer, 0
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            with connection:
                connection.recv(65536)
                self.requests += 1
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
                                   b"Content-Length: %d\r\n\r\n%s" % (len(self.answer), self.answer))

    def close(self) -> None:
        import socket

        self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self.server.close()
        self.thread.join(timeout=30)


class _TenantSecrets:
    async def read(self, namespace: str, name: str, field_path: str) -> dict[str, str]:
        return {"token": "tenant-token"}

    async def for_task(self, ref, spec):
        from reactor.kube.secrets import TaskSecrets

        return TaskSecrets()


class _PullRequestStatus:
    """What the publisher writes of the task's status (TaskStatus.write_pull_request)."""

    def __init__(self) -> None:
        self.conditions: list[dict] = []

    async def write_pull_request(self, pull_request, opened: bool, reason: str, message: str) -> None:
        self.conditions = [{"type": "PullRequestOpened", "status": str(opened), "reason": reason, "message": message}]


async def test_a_forge_answering_garbage_leaves_the_task_a_condition_saying_so():
    """A task's forge is any host its tenant names. One answering 200 with an HTML page (or
    JSON that is not a pull request) made the task's publisher die of a ValueError or
    KeyError nobody caught: no condition, no Event, no PR, no retry; the user saw a
    succeeded task with nothing to say where its pull request went. The publisher ends with
    PullRequestOpened False, saying why."""
    from reactor.kube.pullrequests import PullRequests, PullRequestSettings
    from reactor.kube.resource import AgentTaskSpec, TaskRef

    for answer in (b"<html>not an API</html>", b'{"state": "open"}', b"[1, 2]", b'{"number": "twelve"}'):
        forge = _GarbageForge(answer)
        try:
            spec = AgentTaskSpec.model_validate({
                "prompt": "p", "repository": {"url": f"{forge.url}/o/r.git"}, "test": {"command": "true"},
                "result": {"kind": "pullRequest", "forge": "gitea", "tokenSecretRef": {"name": "tenant-forge"}}})
            current = {"phase": "Succeeded", "result": {"pushed": True, "commit": "a" * 40, "branch": "reactor/t"}}
            status = _PullRequestStatus()
            prs = PullRequests(_TenantSecrets(), PullRequestSettings(retry_first=0.01, retry_max=0.01))
            await asyncio.wait_for(prs._publish(TaskRef("team-a", "t", "uid", ""), spec, status, current, None), 30)
        finally:
            forge.close()
        assert forge.requests >= 1
        assert [(c["status"], c["reason"]) for c in status.conditions] == [("False", "ForgeRefused")], answer
        assert "answer" in status.conditions[0]["message"], status.conditions[0]["message"]
