"""Shared fixtures: real git repositories, a work dir with a leak check, an engine of real cells.
Their helpers live in reactor_dev.testing (no test module imports another)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reactor.infra.processes import find_marked_processes
from reactor.workflow.engine import Engine
from reactor_dev.testing.engine import engine_settings
from reactor_dev.testing.repos import make_repo

# The control plane fixtures (crd_installed included), and the end-of-run report: the slowest
# modules, and each group of tests skipped and why (a failure where CI is set).
pytest_plugins = ["reactor_dev.testing.kube_fixtures", "reactor_dev.testing.suite_report"]

# Servers of `reactor` subprocesses (CLI, operator) start on a machine this suite keeps busy.
os.environ.setdefault("REACTOR_HEALTH_TIMEOUT", "60")


# `make test` runs the suite on two workers (pytest-xdist):
# - a module runs whole on one worker: its shared fixture (an operator and its tasks, a Gitea)
#   is paid once; the dev node's tests share one worker: one node per machine;
# - the modules that start both a control plane and agents, and the node's (minutes each),
#   are handed out first, so that no worker is left with one at the end while the other idles.


def _scope(nodeid: str) -> str:
    path = nodeid.split("::")[0]
    return "tests/node" if path.startswith("tests/node/") else path


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    # xdist's loadscope, scoped by module (the node's tests as one). Not `--dist loadgroup`:
    # under pytest 9 its groups are silently ignored (measured: marked tests still split).
    # Only for `--dist loadscope` (what `make test` asks for): another mode chosen on the
    # command line (`--dist each`, `load`) is xdist's own.
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    from reactor_dev.testing.kube_fixtures import KUBE_FIXTURES  # a plugin: imported (and rewritten) by now

    def heavy(item: pytest.Item) -> bool:
        return _scope(item.nodeid) == "tests/node" or (bool(KUBE_FIXTURES & set(getattr(item, "fixturenames", ())))
                                                       and bool(item.get_closest_marker("opencode")))

    heavy_scopes = {_scope(item.nodeid) for item in items if heavy(item)}
    items.sort(key=lambda item: _scope(item.nodeid) not in heavy_scopes)  # stable: file order otherwise


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


@pytest.fixture
def engine(work_dir: Path) -> Engine:
    """An engine running real cells under ``work_dir``; every port released afterwards."""
    engine = Engine(engine_settings(work_dir))
    yield engine
    assert engine.ports.held() == {}, "every port is released"
