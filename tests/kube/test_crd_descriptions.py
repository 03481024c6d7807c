"""Every field of the AgentTask CRD is described, as `kubectl explain` shows users."""

from __future__ import annotations

import yaml

from tests.kube.conftest import CRD


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
    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _undescribed(schema, "agenttask") == []


def test_kubectl_explain_describes_spec_and_status(crd_installed):
    for path in ("agenttask.spec", "agenttask.spec.repository", "agenttask.spec.agent",
                 "agenttask.spec.test", "agenttask.status", "agenttask.status.result"):
        out = crd_installed.kubectl("explain", path)
        assert out.returncode == 0, out.stderr
        assert "<no description>" not in out.stdout, f"kubectl explain {path}:\n{out.stdout}"
    spec = crd_installed.kubectl("explain", "agenttask.spec.repository.branch").stdout
    assert "Default: main" in spec
