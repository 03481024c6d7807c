"""Shared fixtures: real git repositories, an engine with its own work dir, leak checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reactor.infra.processes import find_marked_processes
from reactor_dev.testing.repos import make_repo

pytest_plugins = ["reactor_dev.testing.kube_fixtures"]

# Servers of `reactor` subprocesses (CLI, operator) start on a machine this suite keeps busy.
os.environ.setdefault("REACTOR_HEALTH_TIMEOUT", "60")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo")


@pytest.fixture
def work_dir(tmp_path: Path):
    """A work dir of our own; afterwards no server that any test started under it may live."""
    path = tmp_path / "work"
    path.mkdir()
    yield path
    leaked = find_marked_processes(str(path.resolve()))
    for proc in leaked:  # end them so one failure does not cascade, then fail the test
        os.killpg(proc.pid, 9)
    assert not leaked, f"servers left running: {leaked}"
