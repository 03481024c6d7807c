"""The AgentTask spec model and its conversion to the engine's TaskSpec."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from reactor.kube.resource import AgentTaskSpec, AgentTaskStatus, TaskRef, format_time, parse_time
from reactor.workflow.types import Phase

REF = TaskRef("team-a", "fix-add", "0123456789abcdef", "2026-01-01T00:00:00Z")


def test_defaults_and_conversion():
    spec = AgentTaskSpec.model_validate({
        "prompt": "Fix add", "repository": {"url": "https://example.com/app.git"},
        "test": {"command": "make test", "protect": ["tests/"]}, "timeout": "1h",
    })
    task = spec.to_task_spec(REF, Path("/mirror.git"), {"API_KEY": "sk-secret-value"}, started_at=1000.0)
    assert task.task_id == "fix-add" and task.branch == "reactor/fix-add" and task.base_branch == "main"
    assert task.repo == Path("/mirror.git") and task.test_timeout == 600.0 and task.timeout == 3600.0
    assert task.protect == ["tests/"] and task.started_at == 1000.0
    assert task.env == {"API_KEY": "sk-secret-value"}
    assert "sk-secret-value" not in repr(task) and "sk-secret-value" not in task.model_dump_json()
    assert REF.cell_id == "team-a.fix-add.01234567"


def test_every_spec_field_of_the_crd_is_modelled():
    """A field the CRD accepts but the model ignores would be silently dropped."""
    crd = yaml.safe_load(open("crds/agenttask.yaml"))
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]

    def aliases(model) -> set[str]:
        return {field.alias or name for name, field in model.model_fields.items()}

    assert set(schema["properties"]) == aliases(AgentTaskSpec)
    for name in ("repository", "test", "agent"):
        nested = AgentTaskSpec.model_fields[{"repository": "repository", "test": "test", "agent": "agent"}[name]]
        assert set(schema["properties"][name]["properties"]) == aliases(nested.annotation), name


@pytest.mark.parametrize("text", ["2026-11-24T10:30:05Z", "1970-01-01T00:00:00Z"])
def test_status_times_round_trip(text):
    assert format_time(parse_time(text)) == text


def test_unreadable_times_are_absent():
    assert parse_time(None) is None and parse_time("yesterday") is None


def test_the_status_read_back_is_typed_and_a_hand_edited_field_is_left_out():
    status = AgentTaskStatus.of({"status": {
        "phase": "Pushing", "attempts": 1, "startTime": "2026-01-01T00:00:00Z",
        "conditions": [{"type": "Succeeded", "status": "Unknown", "reason": "Pushing"}],
        "cell": {"serverPid": 42, "cellId": "ns.t.0123"}, "result": {"commit": "a" * 40, "filesChanged": ["calc.py"]},
        "progress": {"inputTokens": 10, "totalTokens": 12, "cost": 0.5, "activity": "edit calc.py"}}})
    assert status.phase is Phase.PUSHING and not status.finished and not status.waiting
    assert status.reason == "Pushing" and status.commit == "a" * 40 and status.cell.server_pid == 42
    assert status.result.as_written() == {"commit": "a" * 40, "filesChanged": ["calc.py"]}
    assert status.progress.total_tokens == 12 and status.progress.cost == 0.5
    edited = AgentTaskStatus.of({"status": {"phase": "Sleeping", "attempts": "many", "message": "kept"}})
    assert edited.phase is None and edited.attempts == 0 and edited.message == "kept"
