"""A cell that outlived its operator is reattached only when the operator's private record
proves the running process is the launcher it started (pid, start time, command line,
markers), and the record itself is never reached through a link."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import replace

import pytest

from reactor.infra import launcher
from reactor.infra.cellrecords import CellRecord, CellRecords, start_ticks, verify
from reactor.infra.processes import Owner, marker_env
from reactor.infra.servers import kill_live
from reactor_dev.testing.helpers import wait_for
from reactor_dev.testing.matrix import process_alive

DEAD_OWNER = "1:1.00"  # an operator that is gone


@pytest.fixture
def running_cell(tmp_path):
    """A real cell launcher (no parent-death signal, a deadline) running a stand-in server."""
    server = tmp_path / "opencode"
    server.write_text("#!/bin/sh\nexec sleep 60\n")
    server.chmod(0o755)
    work_dir = tmp_path / "work"
    launch = launcher.prepare([str(server), "serve", "--port", "8123", "--hostname", "127.0.0.1"],
                              {"PATH": "/usr/bin:/bin"}, None, deadline=60, parent_death=False,
                              launcher_env=marker_env("ns.t1.cell", Owner.from_token(DEAD_OWNER), str(work_dir)))
    try:
        proc = subprocess.Popen(launch.argv, env=launch.env, pass_fds=launch.pass_fds, start_new_session=True)
    finally:
        launch.close()
    record = CellRecord("ns.t1.cell", proc.pid, start_ticks(proc.pid), 8123, "pw", "ses_1", DEAD_OWNER, 0.0)
    yield record, work_dir
    if proc.poll() is None:
        proc.kill()
    proc.wait()


async def test_only_the_recorded_launcher_is_reattached(running_cell):
    record, work_dir = running_cell
    assert verify(replace(record, launcher_start=record.launcher_start + 1), work_dir) is None, "a reused pid"
    assert verify(replace(record, port=8124), work_dir) is None, "another server"
    assert verify(replace(record, owner="2:2.00"), work_dir) is None, "another operator's cell"
    assert verify(replace(record, cell_id="ns.t2.cell"), work_dir) is None, "another cell"
    assert verify(replace(record, launcher_pid=os.getpid(), launcher_start=start_ticks(os.getpid())),
                  work_dir) is None, "not a cell launcher"
    live = verify(record, work_dir)
    assert live is not None
    await kill_live(live, 0.2, work_dir)  # stopped through its pidfd, with everything it started
    assert live.pidfd == -1
    wait_for(lambda: not process_alive(record.launcher_pid), 10, "the launcher gone")


def test_records_are_private_and_no_planted_link_is_read(tmp_path):
    records = CellRecords(tmp_path / "operator")
    record = CellRecord("ns.t1.cell", 4242, 7, 8123, "pw", "ses_1", Owner.current().token, 0.0)
    records.write(record)
    path = records.dir / "ns.t1.cell.json"
    assert records.read("ns.t1.cell") == record
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(records.dir.stat().st_mode) == 0o700
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(path.read_text())
    path.unlink()
    path.symlink_to(elsewhere)
    assert records.read("ns.t1.cell") is None, "a link is not followed"
    path.unlink()
    records.write(record)
    records.write(replace(record, cell_id="ns.gone.cell", owner=DEAD_OWNER))
    assert records.remove_stale(frozenset()) == ["ns.gone.cell"], "only the records of gone operators' cells go"
    assert records.read("ns.t1.cell") == record
    records.remove("ns.t1.cell")
    assert records.read("ns.t1.cell") is None
