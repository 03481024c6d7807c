"""Landlock, seccomp and capability calls (ctypes), and the launcher that runs a cell.

This file is also a script, started by the operator with a fixed environment of its own
choosing (nothing of the task's):

    python -I -S landlock.py --config-fd N -- COMMAND [ARGS...]

Descriptor N (a memfd) holds the launch configuration as JSON: the command's environment
(the task's secrets included), the confinement policy, a deadline. Neither argv (readable by
every process of the user) nor the launcher's own environment (which would act on the
dynamic loader and on Python before any confinement: LD_PRELOAD, GCONV_PATH, PYTHON*)
carries any of it; -I -S: no PYTHON* variables, no site-packages, nothing from the cwd. It
uses only the standard library and imports nothing of ``reactor``, so it starts in ~20 ms.
A script rather than a ``preexec_fn``, because the operator has threads and forking a
threaded Python to run Python code before exec is unsafe.

The launcher stays outside the cell as its **subreaper** (PR_SET_CHILD_SUBREAPER): it
forks, confines the child and execs COMMAND with the configured environment there. Every
orphan of the cell (a daemon that forked, called setsid and forked again) is reparented to
it. When the command exits, when the launcher gets SIGTERM (the operator's stop) or its
parent dies (PR_SET_PDEATHSIG), or when the deadline expires, it kills every descendant
(kill the children, reap, repeat until none is left) and exits with the command's status
(EXIT_DEADLINE on expiry). Not being in the cell's Landlock domain, it cannot be signalled
by the cell (ABI >= 6 signal scoping). With ``parent_death`` false in the configuration
(an operator run with --cells-outlive-operator, so that its next incarnation can reattach
to a running cell) the parent's death is not a stop: the deadline, which the operator then
always sets, is what bounds the cell.

What a policy does to the child, in order (all irreversible, inherited by every descendant):
1. ``PR_SET_NO_NEW_PRIVS`` (required by Landlock and seccomp; setuid binaries gain nothing).
2. When running with capabilities (root on a dev machine): lock the securebits, empty the
   bounding, ambient, permitted, effective and inheritable sets. Root *with* capabilities
   could still read other processes' /proc/PID/environ under Landlock.
3. ABI >= 4: a Landlock layer over TCP: with ``net_ruleset_fd`` the cell's own ruleset
   (connect and bind refused on the operator's ports and the cell port range, bind allowed
   on the cell's own server port); with ``no_tcp`` (Reactor's git runs) no TCP at all.
4. A Landlock ruleset: read/execute beneath ``read`` paths, everything beneath ``write``
   paths, nothing else; on ABI >= 6 also scoping of signals and abstract unix sockets to
   the domain.
5. A seccomp filter: ``socket()`` of the ``refuse_socket_families`` (AF_UNIX) fails with
   EACCES (Landlock does not mediate connecting to a pathname unix socket); socketpair()
   still works.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import signal
import sys
import time

# Syscall numbers: the same on every architecture with the unified table (x86_64, arm64).
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2
ACCESS_NET_BIND_TCP = 1 << 0  # ABI 4
ACCESS_NET_CONNECT_TCP = 1 << 1  # ABI 4
NET_ABI = 4

# Filesystem access rights, by the ABI that introduced them.
ACCESS_FS_EXECUTE = 1 << 0
ACCESS_FS_WRITE_FILE = 1 << 1
ACCESS_FS_READ_FILE = 1 << 2
ACCESS_FS_READ_DIR = 1 << 3
_ABI1_FS = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
ACCESS_FS_REFER = 1 << 13  # ABI 2
ACCESS_FS_TRUNCATE = 1 << 14  # ABI 3
ACCESS_FS_IOCTL_DEV = 1 << 15  # ABI 5
# Rights that make sense on a file (a rule on a regular file with others is EINVAL).
_FILE_RIGHTS = ACCESS_FS_EXECUTE | ACCESS_FS_WRITE_FILE | ACCESS_FS_READ_FILE | ACCESS_FS_TRUNCATE | ACCESS_FS_IOCTL_DEV
READ_RIGHTS = ACCESS_FS_EXECUTE | ACCESS_FS_READ_FILE | ACCESS_FS_READ_DIR

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

_PR_SET_NO_NEW_PRIVS = 38
_PR_CAPBSET_DROP = 24
_PR_SET_SECUREBITS = 28
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
# NOROOT, NO_SETUID_FIXUP, KEEP_CAPS (off) and NO_CAP_AMBIENT_RAISE, each with its lock bit.
_SECUREBITS_LOCKED_DOWN = 0b11101111
_CAP_VERSION_3 = 0x20080522


class LandlockError(OSError):
    pass


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise LandlockError(errno, f"{what}: {os.strerror(errno)}")
    return result


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is missing or disabled."""
    if platform.system() != "Linux":
        return 0
    result = _libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(result), 0)


def handled_fs(abi: int) -> int:
    rights = _ABI1_FS
    if abi >= 2:
        rights |= ACCESS_FS_REFER
    if abi >= 3:
        rights |= ACCESS_FS_TRUNCATE
    if abi >= 5:
        rights |= ACCESS_FS_IOCTL_DEV
    return rights


def _has_capabilities() -> bool:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("CapEff:", "CapPrm:", "CapBnd:", "CapAmb:")) and int(line.split()[1], 16):
                return True
    return False


def drop_capabilities() -> None:
    """Give up every capability for good (root stays uid 0 but is an ordinary user)."""
    if not _has_capabilities():
        return
    # Needs CAP_SETPCAP (as do the bounding-set drops); without it these fail quietly and
    # the check at the end decides.
    _libc.prctl(_PR_SET_SECUREBITS, _SECUREBITS_LOCKED_DOWN, 0, 0, 0)
    with open("/proc/sys/kernel/cap_last_cap") as last:
        for cap in range(int(last.read()) + 1):
            _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # EPERM without CAP_SETPCAP: checked below
    _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header, data = _CapHeader(_CAP_VERSION_3, 0), (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")
    with open("/proc/self/status") as status:
        left = [line.strip() for line in status if line.startswith(("CapEff:", "CapPrm:", "CapAmb:"))
                and int(line.split()[1], 16)]
    if left:
        raise LandlockError(1, f"capabilities remain after dropping them: {left}")


def restrict(read: list[str], write: list[str], abi: int | None = None, scope: bool = True) -> dict:
    """Confine this process (and its future children). Paths that do not exist are skipped.
    Returns what was applied, for the caller's report."""
    abi = abi_version() if abi is None else abi
    if abi < 1:
        raise LandlockError(38, "Landlock is not available in this kernel")
    fs = handled_fs(abi)
    attr = _RulesetAttr(handled_access_fs=fs, handled_access_net=0,
                        scoped=(SCOPE_SIGNAL | SCOPE_ABSTRACT_UNIX_SOCKET) if scope and abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _check(_libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)),
                     "landlock_create_ruleset")
    try:
        applied = {"read": [], "write": []}
        for paths, rights, key in ((read, READ_RIGHTS, "read"), (write, fs, "write")):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    allowed = rights if os.path.isdir(path) else rights & _FILE_RIGHTS
                    rule = _PathBeneathAttr(allowed_access=allowed & fs, parent_fd=fd)
                    _check(_libc.syscall(_SYS_ADD_RULE, ruleset, ctypes.c_int(_RULE_PATH_BENEATH), ctypes.byref(rule),
                                         ctypes.c_uint32(0)), f"landlock_add_rule {path}")
                    applied[key].append(path)
                finally:
                    os.close(fd)
        _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        _check(_libc.syscall(_SYS_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    applied["abi"] = abi
    applied["scoped"] = bool(attr.scoped)
    return applied


def port_ruleset(denied_ports: set[int]) -> int:
    """A ruleset (fd, ABI >= 4) that handles TCP connect and bind and allows both on every
    port but ``denied_ports``. One per cell: Landlock layers intersect, so a cell's own
    server port can only be allowed in a ruleset of its own (``allow_bind``, added last).
    ~65k rules take 0.2-0.3 s to build, so the operator builds them ahead (a spare pool);
    applying one is a kernel-side copy."""
    handled = ACCESS_NET_BIND_TCP | ACCESS_NET_CONNECT_TCP
    attr = _RulesetAttr(handled_access_fs=0, handled_access_net=handled, scoped=0)
    ruleset = _check(_libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(16), ctypes.c_uint32(0)),
                     "landlock_create_ruleset (net)")
    try:
        rule, add, ref = _NetPortAttr(handled, 0), _libc.syscall, ctypes.byref
        for port in range(1 << 16):
            if port not in denied_ports:
                rule.port = port
                if add(_SYS_ADD_RULE, ruleset, _RULE_NET_PORT, ref(rule), 0) < 0:
                    _check(-1, f"landlock_add_rule port {port}")
    except BaseException:
        os.close(ruleset)
        raise
    return ruleset


def allow_bind(ruleset: int, port: int) -> None:
    """Let the cell bind ``port`` (its server's) in a ruleset from ``port_ruleset``."""
    rule = _NetPortAttr(ACCESS_NET_BIND_TCP, port)
    _check(_libc.syscall(_SYS_ADD_RULE, ruleset, ctypes.c_int(_RULE_NET_PORT), ctypes.byref(rule), ctypes.c_uint32(0)),
           f"landlock_add_rule bind port {port}")


def no_tcp_ruleset() -> int:
    """A ruleset that allows no TCP connect or bind at all (ABI >= 4): Reactor's own git runs
    in a checkout need no network, so a filter planted there gets none."""
    attr = _RulesetAttr(handled_access_fs=0, handled_access_net=ACCESS_NET_BIND_TCP | ACCESS_NET_CONNECT_TCP, scoped=0)
    return _check(_libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(16), ctypes.c_uint32(0)),
                  "landlock_create_ruleset (no tcp)")


def restrict_with(ruleset: int) -> None:
    """Add a prebuilt ruleset as a layer of this process's domain."""
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    _check(_libc.syscall(_SYS_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)), "landlock_restrict_self (net)")


# -- seccomp: refuse socket(AF_UNIX, ...) (Landlock up to ABI 7 does not mediate connect()
# to pathname unix sockets); socketpair() is another syscall and keeps working.

_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_SECCOMP_RET_ALLOW, _SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
_EACCES, _ENOSYS = 13, 38
_IO_URING_SYSCALLS = (425, 426, 427)  # io_uring_setup, _enter, _register: unified table and i386
_AUDIT_ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}  # (arch, __NR_socket)
_AUDIT_ARCH_I386, _I386_SOCKET, _I386_SOCKETCALL = 0x40000003, 359, 102
_X32_BIT = 0x40000000
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def socket_filter(families: list[int]) -> list[tuple[int, int, int, int]]:
    """A classic BPF program for seccomp: socket(family, ...) fails with EACCES for each of
    ``families``; on x86_64 the x32 ABI and the i386 socketcall() multiplexer (whose
    arguments a filter cannot read) fail too. io_uring (setup, enter, register) fails with
    ENOSYS: its IORING_OP_SOCKET and IORING_OP_CONNECT make and connect a socket without the
    socket() syscall, out of a filter's sight (programs that use io_uring fall back on ENOSYS).
    Every other syscall is allowed."""
    arch, nr_socket = _AUDIT_ARCH.get(platform.machine(), (None, None))
    if arch is None:
        raise LandlockError(95, f"no seccomp socket filter for {platform.machine()}")
    # (op, k, jump-if-true label, jump-if-false label); None = next instruction.
    load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    arch_off, nr_off, arg0_off = 4, 0, 16
    by_family = [(jeq, family, "deny", None) for family in families]
    uring = [(jeq, nr, "no_uring", None) for nr in _IO_URING_SYSCALLS]
    code: list = [(load, arch_off, None, None), (jeq, arch, None, "compat"),
                  (load, nr_off, None, None)]
    if arch == 0xC000003E:
        code.append((jge, _X32_BIT, "deny", None))
    code += [*uring, (jeq, nr_socket, None, "allow"), (load, arg0_off, None, None), *by_family,
             (ret, _SECCOMP_RET_ALLOW, None, None)]
    code.append("compat")
    if arch == 0xC000003E:  # i386 programs: socket() by family, socketcall() refused
        code += [(jeq, _AUDIT_ARCH_I386, None, "allow"), (load, nr_off, None, None), *uring,  # same numbers
                 (jeq, _I386_SOCKETCALL, "deny", None), (jeq, _I386_SOCKET, None, "allow"),
                 (load, arg0_off, None, None), *by_family]
    code += ["allow", (ret, _SECCOMP_RET_ALLOW, None, None), "deny", (ret, _SECCOMP_RET_ERRNO | _EACCES, None, None),
             "no_uring", (ret, _SECCOMP_RET_ERRNO | _ENOSYS, None, None)]
    labels, index = {}, 0
    for item in code:
        if isinstance(item, str):
            labels[item] = index
        else:
            index += 1
    program, index = [], 0
    for item in code:
        if isinstance(item, str):
            continue
        op, k, true, false = item
        offset = (lambda label: 0 if label is None else labels[label] - index - 1)
        program.append((op, offset(true), offset(false), k))
        index += 1
    return program


def refuse_sockets(families: list[int]) -> None:
    """Install the filter from ``socket_filter`` (needs NO_NEW_PRIVS, set before)."""
    program = socket_filter(families)
    filters = (_SockFilter * len(program))(*(_SockFilter(*insn) for insn in program))
    prog = _SockFprog(len(program), filters)
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    _check(_libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "prctl(SECCOMP)")


# -- the launcher: a per-cell subreaper outside the cell, its one child confined --

_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36
EXIT_REFUSED = 126  # the command was not run (never unconfined)
EXIT_DEADLINE = 124  # the deadline expired: the command and everything it started were killed
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def confine(policy: dict) -> None:
    """Apply ``policy`` to this process (the launcher's child, right before exec)."""
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    if policy.get("oom_score_adj") is not None:
        try:  # raising it needs no privilege: under memory pressure the kernel kills a cell first
            with open("/proc/self/oom_score_adj", "w") as adj:
                adj.write(str(policy["oom_score_adj"]))
        except OSError:
            pass
    drop_capabilities()
    abi = policy.get("abi")
    net = policy.get("net_ruleset_fd")
    if net is not None:
        restrict_with(int(net))
        os.close(int(net))
    elif policy.get("no_tcp") and (abi or 0) >= NET_ABI:
        ruleset = no_tcp_ruleset()
        try:
            restrict_with(ruleset)
        finally:
            os.close(ruleset)
    restrict(policy["read"], policy["write"], abi=abi)
    families = policy.get("refuse_socket_families")
    if families:
        refuse_sockets(families)


def _exec_child(argv: list[str], env: dict[str, str], policy: dict | None, mask: set) -> None:
    """In the forked child: confine, then exec. Never returns."""
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for signum in (signal.SIGPIPE, signal.SIGXFSZ, *_STOP_SIGNALS, signal.SIGCHLD, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_DFL)  # Python's own dispositions are not the command's
        # Resolved before confining (the PATH's directories may be unreadable after) and with
        # the command's PATH, not the launcher's.
        program = _which(argv[0], env.get("PATH", os.defpath))
        if policy is not None:
            confine(policy)
        os.execve(program, argv, env)
    except BaseException as exc:  # noqa: BLE001 - whatever it is, the command must not run
        try:
            os.write(2, f"reactor-confine: refusing to run {argv[0]!r}: {exc}\n".encode())
        finally:
            os._exit(EXIT_REFUSED)


def _children() -> list[int]:
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(p) for p in children.read().split()]
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: scan every process's parent
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as stat:
                        if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                            found.append(int(entry))
                except (OSError, ValueError, IndexError):
                    continue
        return found


def kill_descendants() -> int:
    """SIGKILL every descendant and reap it; returns how many were killed. As a subreaper,
    the orphans of each killed process become our children: kill the children, reap, repeat
    until none is left (a process forking meanwhile only adds a round)."""
    killed: set[int] = set()
    while True:
        for pid in _children():
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(-1, 0)
            # Every child that has ended, not one a round: a round lists and signals every
            # child, so reaping one a round took minutes for a cell of a few thousand processes.
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return len(killed)


SWEPT_LINE = "reactor-confine: swept"


def _descendants(root: int) -> list[int]:
    """Live (not zombie) descendants of ``root``, from every thread's children list."""
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as children:
                    kids = [int(p) for p in children.read().split()]
            except OSError:
                continue
            for kid in kids:
                try:
                    with open(f"/proc/{kid}/stat") as stat:
                        if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                            continue
                except OSError:
                    continue
                found.append(kid)
                stack.append(kid)
    return found


class _Reaper:
    """The launcher's parent side: reaps every child, remembers the main child's status."""

    def __init__(self, main: int):
        self.main, self.status = main, None

    def reap(self, block: bool = False) -> bool:
        """Reap what has exited; False once there is no child left."""
        while True:
            try:
                pid, wstatus = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            if pid == self.main:
                self.status = wstatus
            if block:
                return True

    def sweep(self) -> int:
        """Kill every process of the cell but the main child (the agent's turn is over: no
        process of it may run on while its result is tested and committed). Repeats until
        none is left (orphans of killed processes come to us)."""
        killed: set[int] = set()
        for _ in range(200):
            victims = [p for p in _children() if p != self.main] + _descendants(self.main)
            if not victims:
                break
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.002)
            self.reap()
        return len(killed)


def supervise(argv: list[str], env: dict[str, str], policy: dict | None, deadline: float | None = None,
              term_grace: float = 1.0, parent_death: bool = True, sweep_token: str = "") -> int:
    """Run ``argv`` in a confined child and stay outside it as its subreaper. Returns the
    exit code to leave with: the child's (128+N for a signal), EXIT_DEADLINE when
    ``deadline`` (seconds) expired. Every descendant is gone when this returns.
    SIGUSR1: kill every process of the cell but the main child, then say so on stdout, with
    ``sweep_token`` (from the operator, never seen by the cell before that line: the cell
    writes the same stdout, and its own "swept" line must not pass for ours).
    ``parent_death``: the parent's death stops the cell (PR_SET_PDEATHSIG); False only with
    a deadline (a cell meant to outlive its operator still ends with its time box)."""
    if not parent_death and deadline is None:
        raise LandlockError(22, "a cell that may outlive its operator needs a deadline")
    parent = os.getppid()
    _check(_libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(CHILD_SUBREAPER)")
    if parent_death:
        _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0), "prctl(PDEATHSIG)")
    watched = {signal.SIGCHLD, signal.SIGUSR1, *_STOP_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    if parent_death and os.getppid() != parent:  # the operator died before PDEATHSIG was set
        return 128 + signal.SIGTERM
    main = os.fork()
    if main == 0:
        _exec_child(argv, env, policy, mask)
    env.clear()  # the reaper keeps no secret it does not need
    if policy is not None and policy.get("net_ruleset_fd") is not None:
        try:  # the child has applied (or will apply) its own copy; ours would pin its memory
            os.close(int(policy["net_ruleset_fd"]))
        except OSError:
            pass
    reaper, now = _Reaper(main), time.monotonic
    until = None if deadline is None else now() + deadline
    expired, stopping = False, False
    while reaper.status is None:
        timeout = None if until is None else max(0.0, until - now())
        # Checked every round, not only when no signal is pending: a cell whose children
        # end (or stop and continue) without pause would otherwise hold its launcher past it.
        info = None if timeout == 0.0 else (
            signal.sigtimedwait(watched, timeout) if timeout is not None else signal.sigwaitinfo(watched))
        if info is None:  # deadline (or the grace after a stop) is over
            expired = not stopping
            break
        if info.si_signo == signal.SIGCHLD:
            reaper.reap()  # the main child, or an orphan that came to us
        elif info.si_signo == signal.SIGUSR1:
            swept = reaper.sweep()
            try:
                os.write(1, f"\n{SWEPT_LINE} {sweep_token + ' ' if sweep_token else ''}{swept} processes\n".encode())
            except OSError:
                pass
        elif not stopping:  # stop: the main child may end in its own way, briefly; then everything goes
            stopping = True
            try:
                os.kill(main, signal.SIGTERM)
            except ProcessLookupError:
                pass
            until = now() + term_grace if until is None else min(until, now() + term_grace)
    killed = kill_descendants()
    if expired:
        os.write(2, f"reactor-confine: deadline of {deadline:g}s expired: killed {argv[0]!r} and everything it "
                    f"started ({killed} processes)\n".encode())
        return EXIT_DEADLINE
    if reaper.status is None:
        return 128 + signal.SIGTERM
    code = os.waitstatus_to_exitcode(reaper.status)
    return code if code >= 0 else 128 - code


def read_config(fd: int) -> dict:
    """The launch configuration from an inherited descriptor (a memfd or pipe), then closed."""
    chunks = []
    try:
        offset = 0
        while True:
            try:
                chunk = os.pread(fd, 1 << 16, offset)
            except OSError:  # a pipe: no positional reads
                chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)
    return json.loads(b"".join(chunks))


def launch(config_fd: int, argv: list[str]) -> int:
    config = read_config(config_fd)
    env = dict(config.get("env") or {})
    for name in config.get("pass_env", ()):  # e.g. GIT_PROTOCOL, set by a git that runs us
        if name in os.environ:
            env[name] = os.environ[name]
    return supervise(argv, env, config.get("policy"), config.get("deadline"), config.get("term_grace", 1.0),
                     config.get("parent_death", True) is not False, str(config.get("sweep_token") or ""))


def _which(name: str, path: str) -> str:
    if "/" in name:
        return name
    for directory in path.split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(2, f"{name}: command not found on PATH")


def main(args: list[str]) -> int:
    if len(args) < 4 or args[0] != "--config-fd" or args[2] != "--":
        print("usage: landlock.py --config-fd N -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    try:
        return launch(int(args[1]), args[3:])
    except (OSError, ValueError, KeyError) as exc:
        # Never run the command unconfined: fail, loudly.
        print(f"reactor-confine: refusing to run {args[3]!r}: {exc}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
