"""Shared fixtures: real git repositories, an engine with its own work dir, leak checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reactor.infra.processes import find_marked_processes
from reactor.testing.repos import git, make_repo

pytest_plugins = ["reactor.testing.kube_fixtures"]

@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo")


def worktrees_of(repo: Path, work_dir: Path) -> list[str]:
    """Cell checkouts of ``repo`` under ``work_dir``: clones that borrow its objects."""
    objects = (repo / git(repo, "rev-parse", "--git-common-dir") / "objects").resolve()
    return sorted(str(alternates.parents[3]) for alternates in Path(work_dir).glob("worktrees/*/*/.git/objects/info/alternates")
                  if Path(alternates.read_text().strip()).resolve() == objects)


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
