"""The fault matrix (docs/faults.md) on the real stack: a real kube-apiserver, `reactor
operator` as a real process, real opencode servers, real git; only the model is scripted.

Each module shares one operator (or a few, when a row kills one) and applies its rows'
tasks at once, so rows that do not interfere run concurrently; each test then checks one
row: what the user sees (phase, reason, message) and that nothing is left (``Leftovers``).
Every task gets its own origin repository, whose hooks count the pushes it receives and
can hold one in flight (reactor_dev.testing.matrix).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from reactor.infra.processes import find_marked_processes
from reactor_dev.testing.kube_fixtures import temporary_namespace
from reactor_dev.testing.matrix import Matrix
from reactor_dev.testing.scripted_model import Script, ScriptedModel


@pytest.fixture(scope="module")
def faults_namespace(kube_api, request) -> Iterator[str]:
    module = request.module.__name__.rsplit('.', 1)[-1].replace('_', '-')[5:30].strip('-')
    with temporary_namespace(kube_api, f"faults-{module}-{uuid.uuid4().hex[:6]}") as name:
        yield name


@pytest.fixture(scope="module")
def matrix(crd_installed, faults_namespace, tmp_path_factory) -> Iterator[Matrix]:
    """A module's tasks and operators; afterwards every task is deleted while an operator
    still runs (so finalizers are released), then the operators stop."""
    with ScriptedModel(Script()) as model:
        m = Matrix(crd_installed, faults_namespace, tmp_path_factory.mktemp("faults"), model)
        try:
            yield m
        finally:
            for row in m.rows.values():
                row.origin.release()  # a push a failed test left held would hold its deletion
            try:
                if m.operators and m.operator.process and m.operator.process.poll() is None:
                    crd_installed.kubectl("delete", "agenttasks", "--all", "-n", faults_namespace, "--wait=true",
                                          "--timeout=60s", timeout=90)
            finally:
                for op in m.operators:
                    op.stop()
            leaked = find_marked_processes(str(m.work_dir.resolve()))
            for proc in leaked:  # end them so one failure does not cascade, then fail
                os.killpg(proc.pid, 9)
            assert not leaked, f"servers left running: {leaked}"
