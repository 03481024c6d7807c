"""Cell confinement: what a cell may read, write and signal, enforced by the kernel.

A cell (its `opencode serve` and everything that starts: the agent's shells, the test
command, OpenCode's helper copies of itself, and Reactor's own git runs in the cell) is
untrusted. Each cell gets a Landlock domain of its own, applied in a small launcher
(`landlock.py`) right before exec:

- write: only its checkout and its state directory (XDG data/state/config, HOME, TMPDIR);
- read, an allowlist: the OS directories (``SYSTEM_READ``, minus ``SYSTEM_SECRETS`` such as
  /etc/shadow), the toolchains on PATH, the opencode install and its plugin seed, Reactor's
  package, the objects of the repository it was cloned from, and its own cell. Nothing
  else: not temp dirs, /run, home directories, the operator's work dir beyond the cell
  (other checkouts, other cells' state, mirrors, the operator's private dir), and never the
  protected paths (service-account token, kubeconfig, ...), even inside a granted tree;
- processes: Landlock forbids ptrace and /proc/PID/environ|mem of processes outside the
  domain (for a process without capabilities: every capability is dropped), and on ABI 6
  (Linux 6.12) signals and abstract unix sockets are scoped to the domain.

Landlock rules only grant, so a protected path inside a granted tree is hidden by granting
its siblings (and those of each ancestor) instead of its parent: `readable_roots()`.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from reactor.errors import ConfigurationError
from reactor.infra import landlock, launcher

log = logging.getLogger(__name__)

MIN_ABI = 1  # filesystem rules and the ptrace restriction (Linux 5.13)
SCOPE_ABI = 6  # signal and abstract-socket scoping (Linux 6.12)
# Cells are the first the kernel's OOM killer picks, never the operator (raising needs no privilege).
# The maximum: in a pod the kubelet already gave every process a high score (Burstable:
# ~930 here) and an unprivileged process cannot go below it, so 800 would silently not apply.
CELL_OOM_SCORE_ADJ = 1000

# Credentials a cell must never read, even where a grant covers them: the operator's home
# is not granted, but on a developer's machine toolchains under it are (through PATH, see
# toolchain_roots, or --readable-path), while these credential paths stay hidden.
DEFAULT_PROTECTED_PATHS = (
    "/var/run/secrets", "/run/secrets", "~/.kube", "~/.ssh", "~/.gnupg", "~/.aws", "~/.azure",
    "~/.config/gcloud", "~/.docker", "~/.git-credentials", "~/.netrc", "~/.npmrc", "~/.pypirc",
    "~/.config/gh", "~/.cargo/credentials", "~/.cargo/credentials.toml", "~/.local/share/opencode",
    "~/.config/opencode", "~/.local/share/keyrings",
)
# What every cell may read: the operating system. Everything else is granted by name
# (toolchains, opencode, Reactor, the cell's own paths) or not at all.
SYSTEM_READ = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/sys", "/dev")
# Secrets inside those. A root cell with every capability dropped still owns root's 0600
# files, so the policy itself must leave them out. Globs allowed. /dev/shm and /dev/mqueue
# are temp dirs of every process on the machine.
SYSTEM_SECRETS = (
    "/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers", "/etc/sudoers.d",
    "/etc/ssh/*_key", "/etc/ssl/private", "/etc/security/opasswd", "/etc/krb5.keytab", "/etc/kubernetes",
    "/etc/rancher", "/dev/shm", "/dev/mqueue",
)
# Never granted as a whole, even as a toolchain's install prefix (a PATH entry such as ~/bin
# grants ~/bin, not the home dir): temp dirs, runtime state, home directories.
NEVER_WHOLE = ("/", "/tmp", "/var/tmp", "/run", "/var/run", "/var", "/home", "/root", "/dev/shm", "~")
# Devices any program expects to write.
_WRITABLE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/tty")


class ConfinementUnavailable(ConfigurationError):
    """The kernel cannot confine cells, and running them unconfined was not allowed."""


@dataclass
class ConfinementSettings:
    # False only when the user explicitly allows unconfined cells (--allow-unconfined).
    required: bool = True
    # Turned off by --allow-unconfined together with `required`, or by a kernel without Landlock.
    enabled: bool = True
    protected_paths: list[str] = field(default_factory=lambda: list(DEFAULT_PROTECTED_PATHS))
    readable_paths: list[str] = field(default_factory=list)  # extra toolchains a cell may read
    # TCP ports no cell may connect to (ABI >= 4): the process's own listeners (the web page
    # with every task's transcript, the liveness endpoint); the engine adds its cells' ports.
    protected_ports: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class KernelSupport:
    abi: int

    @property
    def filesystem(self) -> bool:
        return self.abi >= MIN_ABI

    @property
    def scoping(self) -> bool:
        return self.abi >= SCOPE_ABI

    @property
    def network(self) -> bool:
        return self.abi >= landlock.NET_ABI

    def describe(self) -> str:
        if not self.filesystem:
            return "Landlock unavailable in this kernel (needs Linux >= 5.13 with landlock in the LSM list)"
        parts = [f"Landlock ABI {self.abi}: filesystem, ptrace/proc"]
        parts.append("operator and cell ports" if self.network
                     else "NOT operator/cell ports (need ABI 4, Linux 6.7)")
        parts.append("signals, abstract sockets" if self.scoping
                     else "NOT signals/abstract sockets (need ABI 6, Linux 6.12)")
        return "; ".join(parts)


@functools.cache
def kernel_support() -> KernelSupport:
    # REACTOR_LANDLOCK_ABI pretends the kernel is older (0: no Landlock): how the tests show
    # what a user sees on such a kernel. It can only lower what the kernel has.
    actual = landlock.abi_version()
    forced = os.environ.get("REACTOR_LANDLOCK_ABI")
    return KernelSupport(min(actual, int(forced)) if forced else actual)


@dataclass(frozen=True)
class ConfinementStatus:
    """What cells get, said once at startup and on every task (never a silent downgrade)."""

    confined: bool
    message: str


def check(settings: ConfinementSettings) -> ConfinementStatus:
    """Decide whether cells run confined. Raises ConfinementUnavailable when the kernel
    cannot and the user did not allow unconfined cells."""
    support = kernel_support()
    if not settings.enabled:
        return ConfinementStatus(False, "cells run UNCONFINED (--allow-unconfined): a task can read and write "
                                        "everything the operator can")
    if not support.filesystem:
        if settings.required:
            raise ConfinementUnavailable(
                f"cannot confine cells: {support.describe()}. Refusing to run cells unconfined; "
                "pass --allow-unconfined to run them anyway (every task can then read the others' secrets)")
        settings.enabled = False
        return ConfinementStatus(False, f"cells run UNCONFINED: {support.describe()} (--allow-unconfined)")
    return ConfinementStatus(True, f"cells confined: {support.describe()}")


def expand(path: str) -> Path | None:
    """A path setting: `~` expanded, symlinks resolved (Landlock sees resolved paths)."""
    if not path:
        return None
    return Path(os.path.realpath(os.path.expanduser(path)))


def _expand_all(patterns: tuple[str, ...] | list[str]) -> list[Path]:
    """Paths and globs, `~` expanded, links resolved (each glob match once)."""
    found = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        for match in (glob.glob(pattern) if glob.has_magic(pattern) else [pattern]):
            path = expand(match)
            if path is not None:
                found.append(path)
    return found


def protected_paths(settings: ConfinementSettings, work_dir: Path) -> list[Path]:
    """What no grant may include: the secrets of the OS directories, the credential paths,
    --protected-path, the kubeconfig, and the work dir (other cells, mirrors, the
    operator's private dir: a cell gets back only its own checkout and state dir)."""
    paths = _expand_all([*SYSTEM_SECRETS, *settings.protected_paths])
    kubeconfig = os.environ.get("KUBECONFIG", "")
    paths += [expand(p) for p in kubeconfig.split(os.pathsep)]
    paths.append(expand(str(work_dir)))
    return sorted({p for p in paths if p is not None and str(p) != "/"})


def _never_whole() -> set[Path]:
    return {p for p in (expand(n) for n in (*NEVER_WHOLE, tempfile.gettempdir())) if p is not None}


def readable_roots(root: Path, protected: list[Path]) -> list[str]:
    """Directories and files beneath ``root`` that contain no protected path, as few as
    possible: ``root`` itself when nothing beneath it is protected, else its children,
    recursively; the protected paths themselves are left out."""
    if any(root == p for p in protected):
        return []
    inner = [p for p in protected if root in p.parents]
    if not inner:
        return [str(root)]
    grants = []
    try:
        children = sorted(root.iterdir())
    except OSError:
        return []
    for child in children:
        real = Path(os.path.realpath(child))
        if child.is_symlink() and real != child:
            # A link's target is granted by its own place in the tree (or not at all).
            continue
        grants += readable_roots(child, protected)
    return grants


def toolchain_roots(path_env: str) -> list[Path]:
    """Install prefixes of the programs on PATH (e.g. ~/.pyenv for ~/.pyenv/shims, the
    interpreter behind a virtualenv's python): a cell needs them to run the tests. A prefix
    that is a temp dir, a home dir or / (PATH=~/bin:...) is not granted whole: the PATH
    entry itself is, or nothing."""
    never = _never_whole()
    roots: set[Path] = set()

    def add(prefix: Path, entry: Path) -> None:
        for candidate in (prefix, entry):
            if candidate not in never:
                roots.add(candidate)
                return

    for entry in path_env.split(os.pathsep):
        if entry and os.path.isabs(entry) and os.path.isdir(entry):
            real = Path(os.path.realpath(entry))
            add(real.parent, real)
    for program in ("python3", "python", "node", "go", "git", "make", "npm", "bash", "sh"):
        found = shutil.which(program, path=path_env)
        if found:
            real = Path(os.path.realpath(found))
            add(real.parent.parent, real.parent)
    return sorted(roots)


def _link_targets(directory: Path, granted: list[Path], never: set[Path]) -> list[Path]:
    """Where the links directly in ``directory`` point, when outside every granted tree
    (/etc/resolv.conf -> /run/systemd/resolve/stub-resolv.conf): the target's directory
    (a resolver rewrites its file by rename), or the file alone when that is a temp or
    runtime root."""
    found = []
    for entry in sorted(directory.iterdir()) if directory.is_dir() else []:
        if not entry.is_symlink():
            continue
        target = Path(os.path.realpath(entry))
        if not target.exists() or any(target == g or g in target.parents for g in granted):
            continue
        found.append(target if target.parent in never else target.parent)
    return found


def _outermost(paths: list[str]) -> list[str]:
    """The paths without those inside another of them (one rule each is enough)."""
    kept: list[str] = []
    for path in sorted(set(paths)):
        if not any(path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


@dataclass
class CellPolicy:
    """One cell's Landlock rules, computed by the engine, applied by the launcher."""

    read: list[str]
    write: list[str]
    # The engine's per-cell TCP rulesets (ABI >= 4; None: the kernel has no network rules or
    # no port needs protecting): the cell cannot connect to or bind the operator's ports and
    # the cell port range, except binding its own server's port.
    net: PortRulesets | None = None

    def fingerprint(self) -> str:
        """What the kernel enforces on a cell started with this policy, as a digest: a cell an
        earlier operator started is reattached only under the same rules as this operator's
        (infra/cellrecords.py)."""
        return policy_fingerprint(self)

    def launch_policy(self, *, net_ruleset_fd: int | None = None, no_tcp: bool = False) -> dict:
        """The policy for the launcher. ``net_ruleset_fd``: the server's ruleset (from
        ``net.take(port)``, passed to the launcher); ``no_tcp``: no TCP at all (git runs)."""
        policy: dict = {"read": self.read, "write": self.write, "abi": kernel_support().abi,
                        "oom_score_adj": CELL_OOM_SCORE_ADJ,
                        "refuse_socket_families": list(launcher.REFUSED_SOCKET_FAMILIES)}
        if net_ruleset_fd is not None:
            policy["net_ruleset_fd"] = net_ruleset_fd
        if no_tcp:
            policy["no_tcp"] = True
        return policy


def policy_fingerprint(policy: CellPolicy | None) -> str:
    """``CellPolicy.fingerprint``; "unconfined" for no policy (--allow-unconfined)."""
    if policy is None:
        return "unconfined"
    rules = {"read": sorted(policy.read), "write": sorted(policy.write), "abi": kernel_support().abi,
             "denied_ports": sorted(policy.net.denied) if policy.net is not None else None,
             "refuse_socket_families": list(launcher.REFUSED_SOCKET_FAMILIES), "oom_score_adj": CELL_OOM_SCORE_ADJ}
    return hashlib.sha256(json.dumps(rules, sort_keys=True).encode()).hexdigest()


class PortRulesets:
    """Per-cell TCP rulesets: connect and bind allowed on every port but the operator's and
    the cell range, each made a cell's by one more rule (bind on its server's port).

    Landlock layers intersect, so a cell's own port cannot be allowed through a shared
    layer; building a ruleset takes ~65k rules (0.2-0.3 s), so a background thread keeps
    ``spare`` of them ready and a cell's start costs one rule (~30 µs). ctypes releases the
    GIL in each syscall, so the event loop gets it back between rules."""

    def __init__(self, denied_ports: set[int], spare: int = 1):
        self.denied = frozenset(denied_ports)
        self.spare = spare
        self._ready: list[int] = []
        self._cond = threading.Condition()
        self._builder: threading.Thread | None = None
        self._error: BaseException | None = None
        # Spare rulesets hold kernel memory (~4 MiB each): closed when the engine goes.
        weakref.finalize(self, _close_all, self._ready)

    def prepare(self) -> None:
        """Start filling the pool (a cell is about to start)."""
        with self._cond:
            if self._builder is None or not self._builder.is_alive():
                if len(self._ready) < self.spare:
                    self._builder = threading.Thread(target=self._fill, name="reactor-port-rulesets", daemon=True)
                    self._builder.start()

    def _fill(self) -> None:
        while True:
            with self._cond:
                if len(self._ready) >= self.spare:
                    return
            try:
                ruleset = landlock.port_ruleset(set(self.denied))
            except BaseException as exc:  # said to the next take()
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                self._ready.append(ruleset)
                self._cond.notify_all()

    def take(self, own_port: int) -> int:
        """A ruleset fd for the cell serving on ``own_port``; the caller closes it once the
        launcher has it."""
        self.prepare()
        with self._cond:
            while not self._ready:
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                if self._builder is None or not self._builder.is_alive():
                    self._cond.release()
                    try:
                        self.prepare()
                    finally:
                        self._cond.acquire()
                self._cond.wait(0.5)
            ruleset = self._ready.pop()
        try:
            landlock.allow_bind(ruleset, own_port)
        except BaseException:
            os.close(ruleset)
            raise
        self.prepare()
        return ruleset

    def close(self) -> None:
        with self._cond:
            _close_all(self._ready)


def _close_all(rulesets: list[int]) -> None:
    while rulesets:
        with contextlib.suppress(OSError):
            os.close(rulesets.pop())


class Confinement:
    """The engine's confinement: computes each cell's policy from shared, precomputed roots."""

    def __init__(self, settings: ConfinementSettings, work_dir: Path, shared_read: list[Path],
                 cell_ports: range = range(0)):
        self.settings = settings
        self.status = check(settings)
        self.work_dir = Path(work_dir).resolve()
        self._protected = protected_paths(settings, self.work_dir)
        self._shared_read = [Path(os.path.realpath(p)) for p in shared_read]
        self._system_read: list[str] | None = None
        self.denied_ports = {*settings.protected_ports, *cell_ports}
        self.port_rulesets = (PortRulesets(self.denied_ports)
                              if self.enabled and kernel_support().network and self.denied_ports else None)

    @property
    def enabled(self) -> bool:
        return self.status.confined

    @property
    def protected(self) -> list[Path]:
        return list(self._protected)

    def system_read(self, path_env: str) -> list[str]:
        """Read grants every cell shares, an allowlist (computed once: it walks the file
        system): the OS directories, the toolchains on PATH, --readable-path, the opencode
        install, its plugin seed and Reactor's package; none of the protected paths."""
        if self._system_read is None:
            protected = self._protected
            system = [Path(p) for p in SYSTEM_READ if os.path.exists(p)]
            grants = []
            for root in system:
                grants += readable_roots(Path(os.path.realpath(root)), protected)
            grants += [str(p) for p in _link_targets(Path("/etc"), system, _never_whole())
                       if not any(p == q or q in p.parents for q in protected)]
            for root in [*toolchain_roots(path_env), *(expand(p) for p in self.settings.readable_paths)]:
                if root is not None and root != Path("/") and not any(root == p or p in root.parents for p in protected):
                    grants += readable_roots(root, protected)
            for shared in self._shared_read:
                grants += readable_roots(shared, [p for p in protected if p != self.work_dir])
            self._system_read = _outermost(grants)
        return self._system_read

    def cell_policy(self, *, writable: list[Path], readable: list[Path], path_env: str) -> CellPolicy:
        """``writable``: the cell's checkout and state dir; ``readable``: what this cell
        alone may read (the objects of the repository its checkout borrows from)."""
        read = [*self.system_read(path_env), *(str(Path(os.path.realpath(p))) for p in readable)]
        write = [str(Path(os.path.realpath(p))) for p in writable] + [d for d in _WRITABLE_DEVICES if os.path.exists(d)]
        if self.port_rulesets is not None:
            self.port_rulesets.prepare()  # built while the checkout and server start
        return CellPolicy(read=read, write=write, net=self.port_rulesets)
