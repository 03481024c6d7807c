"""What a real API server does that fakes get wrong: status subresource, finalizers,
CEL and OpenAPI validation. Runs on the session control plane (or USE_EXISTING_CLUSTER)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import kubernetes
import pytest
from kubernetes.client import ApiException

GROUP, VERSION, PLURAL, KIND = "tests.reactor.dev", "v1", "widgets", "Widget"

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": PLURAL, "singular": "widget", "kind": KIND, "listKind": f"{KIND}List"},
        "versions": [
            {
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {"type": "integer"},
                                    "name": {"type": "string", "pattern": "^[a-z][a-z0-9-]*$"},
                                    "minReplicas": {"type": "integer"},
                                    "maxReplicas": {"type": "integer"},
                                },
                                "x-kubernetes-validations": [
                                    {
                                        "rule": "!has(self.minReplicas) || !has(self.maxReplicas)"
                                        " || self.minReplicas <= self.maxReplicas",
                                        "message": "minReplicas must not exceed maxReplicas",
                                        "fieldPath": ".minReplicas",
                                    }
                                ],
                            },
                            "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                        },
                    }
                },
            }
        ],
    },
}


def eventually(check: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    """Poll ``check`` until it returns something truthy (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def widget_crd(kube_api: kubernetes.client.ApiClient) -> Iterator[str]:
    extensions = kubernetes.client.ApiextensionsV1Api(kube_api)
    name = WIDGET_CRD["metadata"]["name"]
    try:
        extensions.create_custom_resource_definition(WIDGET_CRD)
    except ApiException as error:
        if error.status != 409:  # left by an earlier run against an existing cluster
            raise

    def established() -> bool:
        conditions = extensions.read_custom_resource_definition(name).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    eventually(established, what=f"CRD {name} Established")
    yield name
    try:
        extensions.delete_custom_resource_definition(name)
    except ApiException:
        pass


@pytest.fixture
def widgets(kube_api, widget_crd, namespace):
    """CRUD on widgets in the test's namespace."""
    api = kubernetes.client.CustomObjectsApi(kube_api)

    class Widgets:
        def create(self, name: str, spec: dict, **metadata) -> dict:
            metadata = {"name": name, **metadata}
            body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": metadata, "spec": spec}
            return api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

        def get(self, name: str) -> dict:
            return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

        def patch(self, name: str, body: dict) -> dict:
            return api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body)

        def patch_status(self, name: str, body: dict) -> dict:
            return api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, body)

        def delete(self, name: str) -> None:
            api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

        def exists(self, name: str) -> bool:
            try:
                self.get(name)
            except ApiException as error:
                if error.status == 404:
                    return False
                raise
            return True

    return Widgets()


def test_create_and_read_a_custom_resource(widgets, namespace):
    created = widgets.create("first", {"size": 3, "name": "first"})
    assert created["metadata"]["uid"]
    read = widgets.get("first")
    assert read["spec"] == {"size": 3, "name": "first"}
    assert read["metadata"]["namespace"] == namespace
    assert read["metadata"]["generation"] == 1


def test_status_goes_through_the_status_subresource_only(widgets):
    widgets.create("stat", {"size": 1})
    widgets.patch_status("stat", {"status": {"phase": "Ready"}})
    after_status = widgets.get("stat")
    assert after_status["status"] == {"phase": "Ready"}
    assert after_status["metadata"]["generation"] == 1  # status writes do not bump it

    widgets.patch("stat", {"spec": {"size": 2}, "status": {"phase": "Hacked"}})
    after_main = widgets.get("stat")
    assert after_main["spec"]["size"] == 2
    assert after_main["status"] == {"phase": "Ready"}  # the main resource ignores status
    assert after_main["metadata"]["generation"] == 2


def test_a_finalizer_holds_deletion_until_removed(widgets):
    widgets.create("held", {"size": 1}, finalizers=["tests.reactor.dev/hold"])
    widgets.delete("held")
    held = widgets.get("held")
    assert held["metadata"]["deletionTimestamp"]
    assert held["metadata"]["finalizers"] == ["tests.reactor.dev/hold"]

    widgets.patch("held", {"metadata": {"finalizers": None}})
    eventually(lambda: not widgets.exists("held"), what="the widget to be gone")


def _rejection(create: Callable[[], object]) -> str:
    with pytest.raises(ApiException) as caught:
        create()
    assert caught.value.status == 422, caught.value.body
    return caught.value.body


def test_cel_rule_rejects_with_its_message_naming_the_field(widgets):
    body = _rejection(lambda: widgets.create("cel", {"size": 1, "minReplicas": 5, "maxReplicas": 2}))
    assert "minReplicas must not exceed maxReplicas" in body
    assert "spec.minReplicas" in body
    assert not widgets.exists("cel")


def test_openapi_pattern_rejects_naming_the_field(widgets):
    body = _rejection(lambda: widgets.create("pattern", {"size": 1, "name": "Not_A_Name"}))
    assert "spec.name" in body
    assert "should match '^[a-z][a-z0-9-]*$'" in body
    assert not widgets.exists("pattern")


def test_missing_required_field_is_rejected(widgets):
    body = _rejection(lambda: widgets.create("required", {"name": "ok"}))
    assert "spec.size" in body and "Required value" in body
