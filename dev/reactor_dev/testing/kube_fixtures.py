"""pytest plugin: a real kube-apiserver for the tests that need one.

Register it in the root ``conftest.py`` with ``pytest_plugins = ["reactor_dev.testing.kube_fixtures"]``
(or ``pytest -p reactor_dev.testing.kube_fixtures``).

Fixtures:
  ``kube_assets``   (session) the etcd/kube-apiserver/kubectl binaries
  ``control_plane`` (session) a started :class:`ControlPlane`, or the cluster of the current
                    kubeconfig when ``USE_EXISTING_CLUSTER=true``
  ``kube_api``      (session) a ``kubernetes.client.ApiClient`` for it, as admin
  ``namespace``     (function) a fresh namespace; deleted best-effort afterwards (with no
                    controller-manager it stays Terminating, which harms nothing)
  ``crd_installed`` (session) ``control_plane`` with the AgentTask and SpendLimit CRDs established

Missing binaries FAIL the test with the instructions, never skip it: a skip would hide, in
CI, that the Kubernetes tests did not run. Tests using these fixtures get the ``kube`` mark.
"""

from __future__ import annotations

import contextlib

import re
import uuid
from collections.abc import Iterator
from typing import NoReturn

import kubernetes
import pytest

from reactor_dev.devcluster.assets import Assets, AssetsNotFound, find_assets
from reactor_dev.testing.helpers import install_crds
from reactor_dev.devcluster.controlplane import (
    Cluster,
    ControlPlane,
    ControlPlaneError,
    ExistingCluster,
    use_existing_cluster,
)

KUBE_FIXTURES = {"kube_assets", "control_plane", "kube_api", "namespace", "crd_installed"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if KUBE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kube)


def _fail(error: Exception) -> NoReturn:
    # Outside the `except` block, so the report shows the message, not a chained traceback.
    pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def kube_assets() -> Assets:
    try:
        return find_assets()
    except AssetsNotFound as error:
        failure = error
    _fail(failure)


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    failure: ControlPlaneError | None = None
    if use_existing_cluster():
        try:
            existing = ExistingCluster()
        except ControlPlaneError as error:
            failure = error
        if failure:
            _fail(failure)
        yield existing
        return
    plane = ControlPlane(request.getfixturevalue("kube_assets"))
    try:
        plane.start()
    except ControlPlaneError as error:
        failure = error
    if failure:
        _fail(failure)
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kube_api(control_plane: Cluster) -> Iterator[kubernetes.client.ApiClient]:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(
        config_file=str(control_plane.kubeconfig_path), client_configuration=configuration
    )
    with kubernetes.client.ApiClient(configuration) as api:
        yield api


@pytest.fixture(scope="session")
def crd_installed(control_plane: Cluster) -> Cluster:
    install_crds(control_plane)
    return control_plane


@pytest.fixture
def namespace(kube_api: kubernetes.client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    # Readable in logs: the test's name, cut to fit the 63-character DNS label with a suffix.
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:48].rstrip("-")
    with temporary_namespace(kube_api, f"{slug or 'test'}-{uuid.uuid4().hex[:8]}") as name:
        yield name


@contextlib.contextmanager
def temporary_namespace(kube_api: kubernetes.client.ApiClient, name: str) -> Iterator[str]:
    """A namespace for the block, deleted afterwards (its objects go with it)."""
    core = kubernetes.client.CoreV1Api(kube_api)
    core.create_namespace(kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        with contextlib.suppress(kubernetes.client.ApiException):
            core.delete_namespace(name)
