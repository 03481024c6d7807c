"""Fixtures for the operator tests: the CRD installed on the real API server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reactor_dev.testing.helpers import install_crds  # noqa: F401  (used here and by other modules)

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "agenttask.yaml"
CRDS = [CRD, ROOT / "crds" / "spendlimit.yaml"]  # what the operator watches


@pytest.fixture(scope="session")
def crd_installed(control_plane):
    install_crds(control_plane)
    return control_plane


def agenttask(name: str, **spec_overrides) -> dict:
    spec = {
        "description": "Fix add",
        "prompt": "Fix the add function in calc.py",
        "repository": {"url": "file:///srv/repos/app", "branch": "main"},
        "test": {"command": "python3 -m pytest -q"},
    }
    spec.update(spec_overrides)
    return {"apiVersion": "reactor.dev/v1alpha1", "kind": "AgentTask", "metadata": {"name": name}, "spec": spec}


def kubectl_apply(cluster, namespace: str, obj: dict, *extra: str):
    return cluster.kubectl("apply", "-n", namespace, *extra, "-f", "-", input=json.dumps(obj))
