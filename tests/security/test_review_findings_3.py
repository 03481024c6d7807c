"""Ways in found by the third adversarial review (cells that outlive their operator and are
reattached, and a fleet's green record), each turned into a test at the cheapest level that
proves it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from reactor.infra import landlock, launcher
from reactor.infra.cellrecords import CellRecord, LiveCell
from reactor.infra.confinement import readable_roots
from reactor.infra.processes import Owner
from reactor.infra.servers import OpenCodeServer, ServerSpec

# A cell's own program (it may run any): a few thousand idle processes, orphaned to its
# launcher (their parent exits), the launcher being the cell's subreaper. They end by
# themselves after a minute, so a launcher they held is not held forever.
MANY = r'''
import os, shutil, sys
sleep = shutil.which("sleep")
if os.fork() == 0:
    for _ in range(int(sys.argv[1])):
        os.posix_spawn(sleep, ["sleep", "60"], {})
    os._exit(0)
os.wait()
print("started", flush=True)
os.execvp("sleep", ["sleep", "60"])
'''
PROCESSES = 2500
DEADLINE = 8.0  # the processes are started well before it


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def test_a_cell_of_many_processes_ends_at_its_deadline(tmp_path):
    """At its deadline (or a stop) the launcher killed its children and then reaped one of
    them a round, listing and signalling every child again each round: quadratic. A cell
    of 3000 idle processes held its launcher 36 s past its deadline (a few more thousand:
    hours). A cell outliving its operator has nobody else to end it; an operator's stop of
    a normal cell falls back, after 2 s, to killing the launcher's group and the marked
    processes, and a daemon that left both ran on. The cell ends at its deadline."""
    cell = tmp_path / "cell"
    cell.mkdir()
    (cell / "many.py").write_text(MANY)
    launch = launcher.prepare([sys.executable, "many.py", str(PROCESSES)], {"PATH": os.environ["PATH"]},
                              None, deadline=DEADLINE, term_grace=0.2, parent_death=False)
    try:
        proc = subprocess.Popen(launch.argv, cwd=cell, env=launch.env, pass_fds=launch.pass_fds, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    finally:
        launch.close()
    began = time.monotonic()
    try:
        assert proc.stdout.readline().strip() == "started"
        assert time.monotonic() - began < DEADLINE, "the cell had its processes before its deadline"
        proc.wait(timeout=DEADLINE + 8)
        assert proc.returncode == launcher.EXIT_DEADLINE, proc.stderr.read()
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the cell runs on {time.monotonic() - began - DEADLINE:.0f}s after its deadline") from None
    finally:
        if proc.poll() is None:  # held: its processes end by themselves within a minute
            proc.wait(timeout=300)
        proc.communicate(timeout=30)
    assert _descendants(proc.pid) == []


async def test_a_cell_flooding_its_log_does_not_stall_the_operator(tmp_path):
    """A cell that may outlive its operator writes its output straight to its log, which the
    operator follows for the listening and swept lines. The follower read everything the
    cell had written before it let any other coroutine run: a cell that wrote a few GiB (or
    wrote faster than it was read) froze the operator's event loop, and with it every
    tenant's tasks and the liveness probe. Other coroutines run while it catches up."""
    sleeper = subprocess.Popen(["sleep", "60"])  # stands for the cell's launcher: alive
    try:
        log_path = tmp_path / "operator" / "logs" / "ns.t.cell.log"
        log_path.parent.mkdir(parents=True)
        with open(log_path, "wb") as out:  # what the cell wrote, its sweep's line last
            chunk = b"x" * (1 << 20)
            for _ in range(32):
                out.write(chunk)
            out.write(f"\n{landlock.SWEPT_LINE} launch-token 0 processes\n".encode())
        spec = ServerSpec(binary="opencode", cwd=tmp_path, port=8123, cell_id="ns.t.cell",
                          state_dir=tmp_path / "state", work_dir=tmp_path, log_path=log_path, outlive_deadline=60.0)
        server = OpenCodeServer(spec)
        server.sweep_token = "launch-token"  # its launcher's (fourth review: the cell's own line does not count)
        record = CellRecord("ns.t.cell", sleeper.pid, 0, 8123, "pw", "ses", Owner.current().token, 0.0)
        server._live = LiveCell(record, os.pidfd_open(sleeper.pid))
        follower = asyncio.create_task(server._tail_log(0))
        await asyncio.sleep(0)  # the follower runs first; this resumes at its first yield
        assert not server._swept.is_set(), "the follower read 32 MiB of the cell's output without yielding once"
        await asyncio.wait_for(server._swept.wait(), 30)  # ... and still notices the line
    finally:
        sleeper.kill()
        sleeper.wait()
    await asyncio.wait_for(follower, 30)  # the cell is gone: the follower ends
    server._live.close()


# The cell's server holding its log as stdout (as a cell that may outlive its operator does):
# it takes a write lease on it while no operator reads it, and ignores the lease-break signal.
LEASE = r'''
import fcntl, signal, time
signal.signal(signal.SIGIO, signal.SIG_IGN)
fcntl.fcntl(1, fcntl.F_SETLEASE, fcntl.F_WRLCK)
open("leased", "w").close()
time.sleep(120)
'''


async def test_a_cell_holding_a_lease_on_its_log_does_not_stall_the_operator(tmp_path):
    """While no operator runs, a surviving cell's server (same uid, its log as stdout) took a
    write lease on the log. The next operator's open of the log to follow it then blocked,
    in its event loop, until the kernel broke the lease (fs.lease-break-time, 45 s): every
    tenant's tasks and the liveness probe stood still. Confinement does not stop it
    (Landlock does not mediate leases); the operator must not wait on the cell."""
    cell = tmp_path / "cell"
    cell.mkdir()
    (cell / "lease.py").write_text(LEASE)
    log_path = tmp_path / "operator" / "logs" / "ns.t.cell.log"
    log_path.parent.mkdir(parents=True)
    abi = landlock.abi_version()
    policy = None if abi < 1 else {"read": readable_roots(Path("/"), [tmp_path / "operator"]),
                                   "write": [str(cell), "/dev/null"], "abi": abi,
                                   "refuse_socket_families": list(launcher.REFUSED_SOCKET_FAMILIES)}
    launch = launcher.prepare([sys.executable, "lease.py"], {"PATH": os.environ["PATH"]}, policy, deadline=120,
                              term_grace=0.2, parent_death=False)
    output = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        proc = subprocess.Popen(launch.argv, cwd=cell, env=launch.env, pass_fds=launch.pass_fds, stdout=output,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    finally:
        launch.close()
        os.close(output)
    try:
        deadline = time.monotonic() + 30
        while not (cell / "leased").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the cell could not take its lease"
            await asyncio.sleep(0.02)
        spec = ServerSpec(binary="opencode", cwd=cell, port=8123, cell_id="ns.t.cell", state_dir=tmp_path / "state",
                          work_dir=tmp_path, log_path=log_path, outlive_deadline=60.0)
        server = OpenCodeServer(spec)
        record = CellRecord("ns.t.cell", proc.pid, 0, 8123, "pw", "ses", Owner.current().token, 0.0)
        server._live = LiveCell(record, os.pidfd_open(proc.pid))
        began = time.monotonic()
        follower = asyncio.create_task(server._tail_log(0))
        await asyncio.sleep(0)  # the follower opens the log first; this resumes at its first yield
        assert time.monotonic() - began < 5, f"the operator's loop stood still {time.monotonic() - began:.0f}s"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    await asyncio.wait_for(follower, 30)
    server._live.close()


# The operator quoting a failed boot's last lines, in a process of its own to measure its memory.
QUOTE = r'''
import resource, sys
from pathlib import Path
from reactor.infra.servers import OpenCodeServer, ServerSpec
log = Path(sys.argv[1])
spec = ServerSpec(binary="opencode", cwd=log.parent, port=8123, cell_id="ns.t.cell", state_dir=log.parent / "state",
                  work_dir=log.parent, log_path=log, outlive_deadline=60.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tail = OpenCodeServer(spec).log_tail()
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(grown >> 10, tail.splitlines()[-1])
'''


def test_a_failed_boot_quotes_only_the_end_of_a_flooded_log(tmp_path):
    """A cell that may outlive its operator writes its log itself, without the 4 MiB cap: it
    can make it as large as the disk allows, then have its next server fail to boot (it
    writes its own state dir). The boot error quoted the log's last lines by reading the
    whole file into the operator's memory (GiB, in its event loop). Only its end is read."""
    log_path = tmp_path / "ns.t.cell.log"
    with open(log_path, "wb") as out:
        out.truncate(512 << 20)  # 512 MiB the cell wrote (sparse here: costs no disk)
        out.seek(0, os.SEEK_END)
        out.write(b"\nError: the config is invalid\n")
    quoted = subprocess.run([sys.executable, "-c", QUOTE, str(log_path)], capture_output=True, text=True, timeout=120)
    assert quoted.returncode == 0, quoted.stderr
    grown_mib, last_line = quoted.stdout.strip().split(" ", 1)
    assert last_line == "Error: the config is invalid"
    assert int(grown_mib) < 64, f"quoting the log grew the operator by {grown_mib} MiB"
