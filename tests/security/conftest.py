"""Fixtures for the confinement tests: an engine like the workflow tests', plus a hostile
cell's targets."""

from __future__ import annotations

from pathlib import Path

import pytest

from reactor.workflow.engine import Engine
from reactor_dev.testing.engine import engine_settings


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    """A credential of the operator's that no cell may read (made protected by the tests)."""
    path = tmp_path / "operator-credentials"
    path.write_text("token: do-not-leak-4711\n")
    return path


@pytest.fixture
def confined_engine(work_dir: Path, secret_file: Path) -> Engine:
    settings = engine_settings(work_dir)
    settings.confinement.protected_paths.append(str(secret_file))
    engine = Engine(settings)
    assert engine.confinement.enabled, engine.confinement.status.message
    yield engine
    assert engine.ports.held() == {}, "every port is released"

