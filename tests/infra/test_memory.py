"""Memory readings: cgroup v1 and v2 files (laid out as the kernel does, in a temp dir),
quantities, and the PSS of real marked processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reactor.infra.memory import CgroupMemory, SimulatedMemory, cell_memory, parse_quantity, process_pss
from reactor.infra.processes import Owner, marker_env

MiB = 1 << 20


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2(tmp_path):
    proc = tmp_path / "cgroup"
    write(proc, "0::/kubepods/pod1/c1\n")
    group = tmp_path / "fs" / "kubepods" / "pod1" / "c1"
    write(group / "memory.max", f"{2048 * MiB}\n")
    write(group / "memory.current", f"{900 * MiB}\n")
    write(group / "memory.stat", f"anon {500 * MiB}\nfile {400 * MiB}\ninactive_file {300 * MiB}\n")
    gauge = CgroupMemory.detect(tmp_path / "fs", proc)
    assert gauge is not None and gauge.version == 2
    reading = gauge.read()
    assert reading.limit == 2048 * MiB and reading.usage == 600 * MiB and reading.headroom == 1448 * MiB


def test_cgroup_v2_namespaced_root_and_no_limit(tmp_path):
    proc = tmp_path / "cgroup"
    write(proc, "0::/\n")
    write(tmp_path / "fs" / "memory.max", "max\n")
    write(tmp_path / "fs" / "memory.current", "1000\n")
    reading = CgroupMemory.detect(tmp_path / "fs", proc).read()
    assert reading.limit is None and reading.usage == 1000 and reading.headroom is None


def test_cgroup_v1_host_path_falls_back_to_the_mount_root(tmp_path):
    # Without a cgroup namespace /proc/self/cgroup names the host's path, but the container
    # sees its own cgroup at the mount's root.
    proc = tmp_path / "cgroup"
    write(proc, "12:pids:/x\n4:memory:/docker/abc\n0::/\n")
    mount = tmp_path / "fs" / "memory"
    write(mount / "memory.limit_in_bytes", f"{1024 * MiB}\n")
    write(mount / "memory.usage_in_bytes", f"{700 * MiB}\n")
    write(mount / "memory.stat", f"cache {300 * MiB}\ninactive_file {1}\ntotal_inactive_file {200 * MiB}\n")
    gauge = CgroupMemory.detect(tmp_path / "fs", proc)
    assert gauge.version == 1 and gauge.directory == mount
    assert gauge.read() == type(gauge.read())(1024 * MiB, 500 * MiB)


def test_cgroup_v1_unlimited(tmp_path):
    proc = tmp_path / "cgroup"
    write(proc, "4:memory:/a\n")
    group = tmp_path / "fs" / "memory" / "a"
    write(group / "memory.limit_in_bytes", "9223372036854771712\n")
    write(group / "memory.usage_in_bytes", "5\n")
    assert CgroupMemory.detect(tmp_path / "fs", proc).read().limit is None


def test_this_machine_has_a_readable_cgroup():
    gauge = CgroupMemory.detect()
    if gauge is None:
        pytest.fail("no memory cgroup found under /sys/fs/cgroup")
    assert gauge.read().usage > 0


def test_parse_quantity():
    assert parse_quantity("1536Mi") == 1536 * MiB
    assert parse_quantity("2Gi") == 2048 * MiB
    assert parse_quantity("800M") == 800_000_000
    assert parse_quantity("12345") == 12345
    with pytest.raises(ValueError, match="1536Mi"):
        parse_quantity("lots")


def test_cell_memory_counts_marked_processes_of_one_work_dir(tmp_path):
    owner = Owner.current()
    hog = "x = bytearray(64 * 1024 * 1024); import sys; sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.read()"
    procs = []
    try:
        for cell, work_dir in (("cell-a", tmp_path / "w1"), ("cell-b", tmp_path / "w2")):
            env = {**os.environ, **marker_env(cell, owner, str(work_dir))}
            proc = subprocess.Popen([sys.executable, "-c", hog], env=env, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            assert proc.stdout.readline() == "ready\n"
            procs.append(proc)
        cells = cell_memory(str(tmp_path / "w1"), owner.token)
        assert set(cells) == {"cell-a"}, "only the cells of this work dir"
        assert cells["cell-a"] >= 64 * MiB
        assert abs(process_pss(procs[0].pid) - cells["cell-a"]) < MiB  # PSS moves as sharers come and go
        assert cell_memory(str(tmp_path / "w1"), "someone-else") == {}
        simulated = SimulatedMemory(512 * MiB, lambda: sum(cell_memory(str(tmp_path / "w1")).values()))
        assert simulated.read().limit == 512 * MiB and simulated.read().usage >= 64 * MiB
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
