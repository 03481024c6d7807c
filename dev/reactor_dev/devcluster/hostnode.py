"""The host-side pieces of the dev node: its network namespace, cgroups, mounts, sysctls and
the paths the kubelet and containerd write outside their configured directories.

Everything the node creates on the host is recorded in a :class:`HostRecord` *before* it
is created, and :func:`teardown` undoes the record; it works from the JSON alone, so a
``dev-cluster down`` after a crashed daemon cleans up just as well as a normal stop.
Nothing here touches what another process created: processes are matched by their own
cgroup or by our containerd socket in their argv, mounts by our work directory, files by
names derived from our network name.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import psutil

from reactor.errors import ReactorError

T = TypeVar("T")
log = logging.getLogger(__name__)

# The kubelet sets these at start (protectKernelDefaults: false) and never restores them.
KUBELET_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
# Written by the kubelet and containerd whatever their configured directories say.
KUBELET_DEVICE_PLUGINS = Path("/var/lib/kubelet/device-plugins")
CONTAINER_LOG_LINKS = Path("/var/log/containers")
CNI_CACHE = Path("/var/lib/cni")
CONTAINERD_SHIM_SOCKETS = Path("/run/containerd/s")
HOST_PATHS = (Path("/var/lib/kubelet"), CONTAINER_LOG_LINKS, CNI_CACHE, Path("/run/containerd"))

SUBNET_BASE = ipaddress.ip_network("10.99.0.0/16")
_LOCK = Path("/run/lock/reactor-dev-node.lock")
_CLONE_NEWNET = 0x40000000


class NodeHostError(ReactorError):
    """The host cannot carry the dev node (not root, a tool missing, no free subnet)."""


@dataclass
class HostRecord:
    """What the node put on the host; persisted as JSON beside the node's state."""

    work_dir: str
    index: int = 0
    netns: str = ""  # the bind-mounted namespace file (no /run/netns entry)
    host_veth: str = ""
    cgroup_name: str = ""
    containerd_socket: str = ""
    cni_network: str = ""
    pod_logs_dir: str = ""
    sysctls: dict[str, str] = field(default_factory=dict)  # values before the kubelet ran
    created_host_paths: list[str] = field(default_factory=list)  # absent before we started
    shim_sockets_before: list[str] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def node_ip(self) -> str:
        return str(_subnet(self.index)[1])

    @property
    def host_ip(self) -> str:
        return str(_subnet(self.index)[2])

    @property
    def pod_cidr(self) -> str:
        return f"10.244.{self.index}.0/24"

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> HostRecord:
        return cls(**json.loads(path.read_text()))


def _subnet(index: int) -> ipaddress.IPv4Network:
    return ipaddress.ip_network(f"10.99.{index}.0/24")


def run(*argv: str, netns: str | None = None, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a host tool, inside the node's network namespace when ``netns`` is given."""
    prefix = ["nsenter", f"--net={netns}", "--"] if netns else []
    result = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise NodeHostError(f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


# --- network -----------------------------------------------------------------------------


def _used_subnet_indexes() -> set[int]:
    """10.99.N.0/24 subnets this host already routes or names a device after."""
    used = set()
    routes = run("ip", "-4", "-o", "route", "show", "table", "all", check=False).stdout
    addresses = run("ip", "-4", "-o", "addr", "show", check=False).stdout
    for line in (routes + addresses).splitlines():
        for word in line.replace("/", " ").split():
            try:
                address = ipaddress.ip_address(word)
            except ValueError:
                continue
            if address in SUBNET_BASE:
                used.add(int(str(address).split(".")[2]))
    links = run("ip", "-o", "link", "show", check=False).stdout
    used |= {i for i in range(1, 255) if f" rnode{i}h" in links or f" rnode{i}h@" in links}
    return used


def create_network(record: HostRecord, save: Callable[[], None]) -> None:
    """A network namespace joined to the host by one veth pair: node 10.99.N.1, host 10.99.N.2.

    No default route and no NAT in the namespace: its processes reach the host side of the
    pair and nothing else. The namespace is a bind-mounted file in the work dir (not
    /run/netns), so it leaves no trace once unmounted."""
    with _host_lock():  # two `up`s must not pick the same subnet
        used = _used_subnet_indexes()
        free = [i for i in range(1, 255) if i not in used]
        if not free:
            raise NodeHostError("no free 10.99.N.0/24 subnet for the dev node's veth")
        record.index = free[0]
        netns = Path(record.work_dir) / "netns"
        record.netns, record.host_veth = str(netns), f"rnode{record.index}h"
        save()  # recorded before created: a crash from here on is still cleaned up
        netns.touch()
        run("unshare", f"--net={netns}", "true")
        node_veth = f"rnode{record.index}n"
        run("ip", "link", "add", node_veth, "type", "veth", "peer", "name", record.host_veth,
            "netns", str(os.getpid()), netns=str(netns))
    subnet = _subnet(record.index)
    run("ip", "addr", "add", f"{record.host_ip}/{subnet.prefixlen}", "dev", record.host_veth)
    run("ip", "link", "set", record.host_veth, "up")
    inside = str(netns)
    run("ip", "link", "set", "lo", "up", netns=inside)
    run("ip", "addr", "add", f"{record.node_ip}/{subnet.prefixlen}", "dev", node_veth, netns=inside)
    run("ip", "link", "set", node_veth, "up", netns=inside)
    # Pods -> the API server, the scripted model: routed through the node's own namespace.
    run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1", netns=inside)


_libc = ctypes.CDLL(None, use_errno=True)


def in_network_namespace(netns: str, function: Callable[[], T]) -> T:
    """Call ``function`` on a thread that has joined ``netns``: sockets it creates live there
    (a server bound on the node's address keeps serving from any thread afterwards)."""
    outcome: dict[str, object] = {}

    def target() -> None:
        fd = os.open(netns, os.O_RDONLY)
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                error = ctypes.get_errno()
                raise OSError(error, f"setns({netns}): {os.strerror(error)}")
            outcome["value"] = function()
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error
        finally:
            os.close(fd)

    thread = threading.Thread(target=target, name="in-node-netns")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --- cgroups -----------------------------------------------------------------------------


def cgroup_mounts() -> list[Path]:
    """Mount points of every cgroup hierarchy (v1 controllers, name=systemd, the unified one)."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] in ("cgroup", "cgroup2"):
            mounts.append(Path(left.split()[4]))
    return mounts


def node_cpu_shares() -> int:
    """The node's CPU weight against the host's other processes: what the kubelet gives
    kubepods at the root (1024 per CPU), i.e. all pods together weigh a machine's worth of
    busy processes, not one. ``REACTOR_NODE_CPU_SHARES`` overrides it, for a machine shared
    with much other work (where 1024 per CPU starves the pods)."""
    value = os.environ.get("REACTOR_NODE_CPU_SHARES", "")
    return int(value) if value.isdigit() and int(value) >= 2 else 1024 * (os.cpu_count() or 1)


def create_cgroup_root(record: HostRecord, save: Callable[[], None]) -> None:
    """The kubelet's ``cgroupRoot``: every pod's cgroup lives below it, in each hierarchy, so
    the node's processes are found (and removed) by cgroup alone."""
    record.cgroup_name = f"reactor-node-{record.index}"
    save()
    for mount in cgroup_mounts():
        path = mount / record.cgroup_name
        path.mkdir(exist_ok=True)
        if (mount / "cpuset.cpus").exists():  # a v1 cpuset child starts empty: inherit
            for name in ("cpuset.cpus", "cpuset.mems"):
                (path / name).write_text((mount / name).read_text())
        if (path / "cpu.shares").exists():
            (path / "cpu.shares").write_text(str(node_cpu_shares()))


def _cgroup_dirs(name: str) -> list[Path]:
    """Every cgroup directory of ours, deepest first."""
    found = []
    for mount in cgroup_mounts():
        root = mount / name
        if root.is_dir():
            found.extend(Path(p) for p, _, _ in os.walk(root))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def cgroup_pids(name: str) -> set[int]:
    pids: set[int] = set()
    for directory in _cgroup_dirs(name):
        try:
            pids |= {int(p) for p in (directory / "cgroup.procs").read_text().split()}
        except OSError:
            pass
    return pids


def kill_cgroup(name: str, deadline: float) -> None:
    """SIGKILL every process in our cgroups until none is left (forks race the first pass)."""
    while pids := cgroup_pids(name):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise NodeHostError(f"processes in cgroup {name} survive SIGKILL: {sorted(pids)}")
        time.sleep(0.05)


def remove_cgroups(name: str, deadline: float) -> list[str]:
    left = []
    for directory in _cgroup_dirs(name):
        while True:
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as error:  # EBUSY while the kernel finishes reaping
                if time.monotonic() > deadline:
                    left.append(f"{directory}: {error.strerror}")
                    break
                time.sleep(0.05)
    return left


# --- sysctls -------------------------------------------------------------------------------
# They are host-wide, and two dev nodes may run at once (two checkouts' test runs): the
# first node to start records the host's values, the last to stop puts them back.
_SYSCTL_HOLDERS = Path("/run/reactor-dev-node/sysctls.json")


@contextlib.contextmanager
def _host_lock():
    import fcntl

    _LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _read_holders() -> dict:
    try:
        shared = json.loads(_SYSCTL_HOLDERS.read_text())
    except (OSError, ValueError):
        return {"originals": {}, "holders": []}
    # A holder whose work dir is gone has stopped (or crashed and was cleaned up).
    shared["holders"] = [h for h in shared.get("holders", []) if Path(h).exists()]
    return shared


def record_sysctls(record: HostRecord, save: Callable[[], None]) -> None:
    with _host_lock():
        shared = _read_holders()
        if not shared["holders"]:
            shared["originals"] = {key: (Path("/proc/sys") / key).read_text().strip() for key in KUBELET_SYSCTLS}
        shared["holders"].append(record.work_dir)
        _SYSCTL_HOLDERS.parent.mkdir(parents=True, exist_ok=True)
        _SYSCTL_HOLDERS.write_text(json.dumps(shared))
        record.sysctls = dict(shared["originals"])
    save()


def restore_sysctls(record: HostRecord) -> None:
    """Put the host's values back, unless another dev node still runs (its kubelet wants them)."""
    with _host_lock():
        shared = _read_holders()
        others = [h for h in shared["holders"] if h != record.work_dir]
        if others:
            shared["holders"] = others
            _SYSCTL_HOLDERS.write_text(json.dumps(shared))
            return
        for key, value in (shared["originals"] or record.sysctls).items():
            path = Path("/proc/sys") / key
            try:
                if path.read_text().strip() != value:
                    path.write_text(value)
            except OSError:
                pass
        _SYSCTL_HOLDERS.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            _SYSCTL_HOLDERS.parent.rmdir()


def sysctls_pending(record: HostRecord) -> list[str]:
    """Sysctls not yet back to the host's values, when no other dev node holds them."""
    shared = _read_holders()
    if [h for h in shared["holders"] if h != record.work_dir]:
        return []
    return [f"sysctl {key}" for key, value in record.sysctls.items()
            if (Path("/proc/sys") / key).read_text().strip() != value]


# --- mounts and host paths -------------------------------------------------------------


def mounts_under(directory: str) -> list[str]:
    """Mount points at or below ``directory``, deepest first (mountinfo escapes spaces as \\040)."""
    base = os.path.realpath(directory)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == base or point.startswith(base + "/"):
            points.append(point)
    return sorted(set(points), key=lambda p: p.count("/"), reverse=True)


def unmount_all(directory: str) -> list[str]:
    """Unmount everything below ``directory``; returns what could not be unmounted."""
    for _ in range(5):  # a bind mount can be stacked on the same point more than once
        points = mounts_under(directory)
        if not points:
            return []
        for point in points:
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "--lazy", point], capture_output=True)
    return mounts_under(directory)


def record_host_paths(record: HostRecord, save: Callable[[], None]) -> None:
    record.created_host_paths = [str(p) for p in HOST_PATHS if not p.exists()]
    record.shim_sockets_before = sorted(p.name for p in CONTAINERD_SHIM_SOCKETS.glob("*"))
    save()


def _socket_alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(0.2)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def remove_host_paths(record: HostRecord) -> list[str]:
    """The kubelet's and containerd's fixed paths: whole trees we created, else only our entries."""
    for created in record.created_host_paths:
        shutil.rmtree(created, ignore_errors=True)
    left = []
    socket_ = KUBELET_DEVICE_PLUGINS / "kubelet.sock"
    if socket_.exists() and not _socket_alive(socket_):
        socket_.unlink(missing_ok=True)
    if record.pod_logs_dir and CONTAINER_LOG_LINKS.is_dir():
        for link in CONTAINER_LOG_LINKS.iterdir():
            if link.is_symlink() and os.readlink(link).startswith(record.pod_logs_dir):
                link.unlink(missing_ok=True)
    if record.cni_network:
        for cached in (CNI_CACHE / "results").glob(f"{record.cni_network}-*"):
            cached.unlink(missing_ok=True)
    before = set(record.shim_sockets_before)
    for shim in CONTAINERD_SHIM_SOCKETS.glob("*"):
        if shim.name not in before and not _socket_alive(shim):
            shim.unlink(missing_ok=True)
    for created in record.created_host_paths:
        if Path(created).exists():
            left.append(created)
    return left


# --- processes --------------------------------------------------------------------------


def kill_recorded(pids: dict[str, int], grace: float) -> None:
    """SIGTERM then SIGKILL each recorded process group, only if its leader is still ours
    (a PID reused by something else is left alone)."""
    targets = []
    for name, pid in pids.items():
        try:
            process = psutil.Process(pid)
            if Path(process.exe()).name == name:
                targets.append(process)
        except (psutil.Error, OSError):
            pass
    for process in targets:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    _, alive = psutil.wait_procs(targets, timeout=grace)
    for process in alive:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    psutil.wait_procs(alive, timeout=5)


def kill_shims(containerd_socket: str) -> None:
    """containerd's shims daemonise out of its process group: match them by our socket."""
    if not containerd_socket:
        return
    shims = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if cmdline and "containerd-shim" in Path(cmdline[0]).name and containerd_socket in cmdline:
            shims.append(process)
    for process in shims:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(shims, timeout=5)


# --- the whole teardown ----------------------------------------------------------------


@contextlib.contextmanager
def _step(what: str):
    started = time.monotonic()
    yield
    log.info("teardown: %s in %.2fs", what, time.monotonic() - started)


def teardown(record: HostRecord, grace: float = 10.0) -> list[str]:
    """Undo everything in ``record``; returns what is still there (empty when clean).

    Order: the kubelet and kube-proxy first (nothing restarts pods), then every process in
    the pods' cgroups, the shims, the remaining daemons; then mounts, the veth, the
    namespace, cgroups, sysctls, host paths, the work dir."""
    left: list[str] = []
    first = {k: v for k, v in record.pids.items() if k in ("kubelet", "kube-proxy")}
    with _step("kubelet and kube-proxy stopped"):
        kill_recorded(first, grace)
    if record.cgroup_name:
        with _step("pod processes killed"):
            try:
                kill_cgroup(record.cgroup_name, time.monotonic() + 20)
            except NodeHostError as error:
                left.append(str(error))
    with _step("shims killed"):
        kill_shims(record.containerd_socket)
    # The API server before etcd (else it only logs errors while it drains); the rest at once.
    rest = {k: v for k, v in record.pids.items() if k not in first and k not in ("kube-apiserver", "etcd")}
    for group in (rest, {k: v for k, v in record.pids.items() if k == "kube-apiserver"},
                  {k: v for k, v in record.pids.items() if k == "etcd"}):
        with _step(f"{', '.join(group) or 'nothing'} stopped"):
            kill_recorded(group, grace)
    if record.host_veth:
        run("ip", "link", "delete", record.host_veth, check=False)
    with _step("unmounted"):
        left += [f"mount {m}" for m in unmount_all(record.work_dir)]
    if record.cgroup_name:
        with _step("cgroups removed"):
            left += remove_cgroups(record.cgroup_name, time.monotonic() + 10)
    restore_sysctls(record)
    left += [f"path {p}" for p in remove_host_paths(record)]
    if not any(item.startswith("mount ") for item in left):
        with _step("work dir removed"):
            shutil.rmtree(record.work_dir, ignore_errors=True)
    if Path(record.work_dir).exists():
        left.append(f"path {record.work_dir}")
    return left


def leftovers(record: HostRecord) -> list[str]:
    """What of ``record`` still exists on the host (for tests and ``down``'s check)."""
    found = []
    if record.host_veth and run("ip", "link", "show", record.host_veth, check=False).returncode == 0:
        found.append(f"device {record.host_veth}")
    found += [f"mount {m}" for m in mounts_under(record.work_dir)]
    if record.cgroup_name:
        found += [f"cgroup {d}" for d in _cgroup_dirs(record.cgroup_name)]
    for name, pid in record.pids.items():
        try:
            if Path(psutil.Process(pid).exe()).name == name:
                found.append(f"process {name} {pid}")
        except (psutil.Error, OSError):
            pass
    if record.containerd_socket:
        for process in psutil.process_iter(["cmdline"]):
            if record.containerd_socket in (process.info.get("cmdline") or []):
                found.append(f"process {process.pid} {' '.join(process.info['cmdline'][:1])}")
    found += sysctls_pending(record)
    found += [f"path {p}" for p in record.created_host_paths if Path(p).exists()]
    if Path(record.work_dir).exists():
        found.append(f"path {record.work_dir}")
    return found
