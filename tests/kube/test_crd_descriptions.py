"""Every field of the CRDs is described, as `kubectl explain` shows users."""

from __future__ import annotations

import yaml

from reactor_dev.testing.helpers import wait_for
from tests.kube.conftest import CRDS


def _undescribed(schema: dict, path: str) -> list[str]:
    missing = []
    for name, field in (schema.get("properties") or {}).items():
        if name != "metadata" and not field.get("description", "").strip():
            missing.append(f"{path}.{name}")
        missing += _undescribed(field, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        missing += _undescribed(schema["items"], f"{path}[]")
    return missing


def test_every_field_has_a_description():
    for path in CRDS:
        crd = yaml.safe_load(path.read_text())
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert _undescribed(schema, crd["spec"]["names"]["singular"]) == []


def test_kubectl_explain_describes_spec_and_status(crd_installed):
    # Established is not yet discoverable: kubectl's discovery may lag the new CRDs a moment.
    wait_for(lambda: crd_installed.kubectl("explain", "spendlimit.status").returncode == 0, 30,
             "kubectl explain finds the CRDs", interval=0.5)
    for path in ("spendlimit.spec", "spendlimit.status", "spendlimit.status.replicas"):
        out = crd_installed.kubectl("explain", path)
        assert out.returncode == 0 and "<no description>" not in out.stdout, f"kubectl explain {path}:\n{out.stdout}"
    for path in ("agenttask.spec", "agenttask.spec.repository", "agenttask.spec.agent",
                 "agenttask.spec.test", "agenttask.status", "agenttask.status.result"):
        out = crd_installed.kubectl("explain", path)
        assert out.returncode == 0, out.stderr
        assert "<no description>" not in out.stdout, f"kubectl explain {path}:\n{out.stdout}"
    spec = crd_installed.kubectl("explain", "agenttask.spec.repository.branch").stdout
    assert "Default: main" in spec
