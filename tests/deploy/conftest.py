"""Fixtures for the deployment tests: the shipped manifests on the real API server."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.kube.conftest import CRD, crd_installed  # noqa: F401  (CRD for the tests; re-exported fixture)

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
EXAMPLES = ROOT / "examples"
SA_USER = "system:serviceaccount:reactor-system:reactor"
SA_GROUPS = ["system:serviceaccounts", "system:serviceaccounts:reactor-system", "system:authenticated"]


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def ok(out) -> str:
    assert out.returncode == 0, f"kubectl failed ({out.returncode}):\n{out.stderr}\n{out.stdout}"
    return out.stdout


@pytest.fixture(scope="session")
def reactor_system(crd_installed):  # noqa: F811
    """The CRD plus the shipped namespace, ServiceAccount and RBAC, really applied (as admin):
    what `kubectl apply -k manifests/` creates, less the Deployment and the volume, which need
    a scheduler and a storage provisioner this control plane does not have."""
    for name in ("namespace.yaml", "serviceaccount.yaml", "rbac.yaml"):
        ok(crd_installed.kubectl("apply", "-f", str(MANIFESTS / name)))
    return crd_installed
