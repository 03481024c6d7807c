"""Ways in found by the fourth adversarial review (the launcher's deadline, reattaching,
the log follower, pull requests, the merge queue's credentials), each turned into a test at
the cheapest level that proves it."""

from __future__ import annotations

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
