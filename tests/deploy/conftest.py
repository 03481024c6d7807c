"""Fixtures for the deployment tests: the shipped manifests on the real API server."""

from __future__ import annotations

import pytest

from reactor_dev.testing.shipped import MANIFESTS
from reactor_dev.testing.tasks import ok


@pytest.fixture(scope="session")
def reactor_system(crd_installed):
    """The CRD plus the shipped namespace, ServiceAccount and RBAC, really applied (as admin):
    what `kubectl apply -k manifests/` creates, less the Deployment and the volume, which need
    a scheduler and a storage provisioner this control plane does not have."""
    for name in ("namespace.yaml", "serviceaccount.yaml", "rbac.yaml"):
        ok(crd_installed.kubectl("apply", "-f", str(MANIFESTS / name)))
    return crd_installed
