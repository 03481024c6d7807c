"""Memory readings for admission: the pod's cgroup (limit and working set) and what each cell's
processes hold (PSS: pages shared between cells, such as the opencode binary's, counted once).

cgroup v2 (``memory.max``, ``memory.current``) and v1 (``memory.limit_in_bytes``,
``memory.usage_in_bytes``). Usage is the *working set*: usage minus inactive file cache, which
the kernel reclaims before it OOM-kills (the kubelet judges eviction by the same figure).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from reactor.infra.processes import MARK_CELL, MARK_OWNER, MARK_WORK_DIR

# cgroup v1 reports "no limit" as a page-rounded 2**63-1.
_V1_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class MemoryReading:
    limit: int | None  # bytes; None: no limit
    usage: int  # bytes, working set

    @property
    def headroom(self) -> int | None:
        return None if self.limit is None else self.limit - self.usage


def parse_quantity(text: str) -> int:
    """Bytes from a Kubernetes-style quantity: 1536Mi, 2Gi, 800M, 1048576."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "K": 10**3, "k": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12}
    value = text.strip()
    for suffix, factor in sorted(units.items(), key=lambda item: -len(item[0])):
        if value.endswith(suffix):
            number = value[: -len(suffix)]
            break
    else:
        number, factor = value, 1
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"not a memory quantity: {text!r} (e.g. 1536Mi, 2Gi)") from None
    if amount < 0:
        raise ValueError(f"not a memory quantity: {text!r}")
    return int(amount * factor)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    return int(text)


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


class CgroupMemory:
    """The memory cgroup of this process (the container's, in a pod)."""

    def __init__(self, directory: Path, version: int):
        self.directory, self.version = directory, version

    @classmethod
    def detect(cls, root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> CgroupMemory | None:
        try:
            lines = proc_cgroup.read_text().splitlines()
        except OSError:
            return None
        v1_path = v2_path = None
        for line in lines:
            hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
            if hierarchy == "0" and controllers == "":
                v2_path = path
            elif "memory" in controllers.split(","):
                v1_path = path
        if v1_path is not None:
            mount = root / "memory"
            # Without a cgroup namespace the path is the host's; the container sees its own
            # cgroup at the mount's root then.
            for directory in (mount / v1_path.lstrip("/"), mount):
                if (directory / "memory.usage_in_bytes").exists():
                    return cls(directory, 1)
        if v2_path is not None:
            for directory in (root / v2_path.lstrip("/"), root):
                if (directory / "memory.current").exists():
                    return cls(directory, 2)
        return None

    def read(self) -> MemoryReading:
        if self.version == 2:
            limit = _read_int(self.directory / "memory.max")
            usage = _read_int(self.directory / "memory.current") or 0
            inactive = _stat_value(self.directory / "memory.stat", "inactive_file")
        else:
            limit = _read_int(self.directory / "memory.limit_in_bytes")
            if limit is not None and limit >= _V1_UNLIMITED:
                limit = None
            usage = _read_int(self.directory / "memory.usage_in_bytes") or 0
            inactive = _stat_value(self.directory / "memory.stat", "total_inactive_file")
        return MemoryReading(limit, max(0, usage - inactive))


class SimulatedMemory:
    """A limit that is not the cgroup's (``--memory-limit``): for tests and for a replica that
    shares its pod's memory with something else. Usage is what ``usage()`` measures."""

    def __init__(self, limit: int, usage: Callable[[], int]):
        self.limit, self._usage = limit, usage

    def read(self) -> MemoryReading:
        return MemoryReading(self.limit, self._usage())


def process_pss(pid: int) -> int:
    """Proportional set size of one process in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def cell_memory(work_dir: str, owner: str | None = None) -> dict[str, int]:
    """PSS of every live cell of ``work_dir`` (and of ``owner``, a Reactor process token), by
    cell: the server, its helpers and the shells its agent and tests run."""
    cells: dict[str, int] = {}
    for process in psutil.process_iter(["pid"]):
        try:
            env = process.environ()
        except (psutil.Error, OSError):
            continue
        cell = env.get(MARK_CELL)
        if cell is None or env.get(MARK_WORK_DIR) != work_dir or (owner is not None and env.get(MARK_OWNER) != owner):
            continue
        cells[cell] = cells.get(cell, 0) + process_pss(process.pid)
    return cells


def replica_memory(work_dir: str, owner: str | None = None) -> int:
    """PSS of this Reactor process and its cells: a replica's usage when its limit is simulated."""
    return process_pss(os.getpid()) + sum(cell_memory(work_dir, owner).values())
