"""Fixtures for the observability tests: real cells (engine), the scripted model."""

from __future__ import annotations

from pathlib import Path

import pytest

from reactor.workflow.engine import Engine
from tests.kube.conftest import crd_installed  # noqa: F401  (re-exported fixture)
from tests.workflow.conftest import engine_settings


@pytest.fixture
def engine(work_dir: Path) -> Engine:
    engine = Engine(engine_settings(work_dir))
    yield engine
    assert engine.ports.held() == {}, "every port is released"
