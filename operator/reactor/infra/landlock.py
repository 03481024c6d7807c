"""Landlock and capability calls (ctypes), and the launcher that confines a command.

This file is also a script: ``python -I -S landlock.py -- COMMAND...`` reads a policy from
the environment variable REACTOR_LANDLOCK_POLICY (JSON, removed before exec), confines
itself and execs COMMAND. It uses only the standard library and imports nothing of
``reactor``, so it starts in ~20 ms and cannot be influenced by the process's sys.path.
A wrapper that execs, rather than a ``preexec_fn``, because the operator has threads and
forking a threaded Python to run Python code before exec is unsafe.

What a policy does, in order (all irreversible, inherited by every descendant):
1. ``PR_SET_NO_NEW_PRIVS`` (required by Landlock; setuid binaries gain nothing).
2. When running with capabilities (root on a dev machine): lock the securebits, empty the
   bounding, ambient, permitted, effective and inheritable sets. Root *with* capabilities
   could still read other processes' /proc/PID/environ under Landlock.
3. With ``net_ruleset_fd`` (ABI >= 4): a first Landlock layer that refuses TCP connections
   to the operator's own ports (its web page, its liveness endpoint, the cells' servers).
   Landlock's network rules only allow, so that ruleset allows every other port: ~65k
   rules, built once by the operator and passed to each launcher as an inherited fd.
4. A Landlock ruleset: read/execute beneath ``read`` paths, everything beneath ``write``
   paths, nothing else; on ABI >= 6 also scoping of signals and abstract unix sockets to
   the domain.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import sys

POLICY_ENV = "REACTOR_LANDLOCK_POLICY"

# Syscall numbers: the same on every architecture with the unified table (x86_64, arm64).
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2
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


def connect_ruleset(denied_ports: set[int]) -> int:
    """A ruleset (fd) that handles TCP connect and allows it to every port but ``denied_ports``
    (ABI >= 4). Built once: ~65k rules take 0.2-0.3 s; applying it is a kernel-side copy."""
    attr = _RulesetAttr(handled_access_fs=0, handled_access_net=ACCESS_NET_CONNECT_TCP, scoped=0)
    ruleset = _check(_libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(16), ctypes.c_uint32(0)),
                     "landlock_create_ruleset (net)")
    try:
        rule, add = _NetPortAttr(ACCESS_NET_CONNECT_TCP, 0), _libc.syscall
        for port in range(1 << 16):
            if port not in denied_ports:
                rule.port = port
                if add(_SYS_ADD_RULE, ruleset, _RULE_NET_PORT, ctypes.byref(rule), 0) < 0:
                    _check(-1, f"landlock_add_rule port {port}")
    except BaseException:
        os.close(ruleset)
        raise
    return ruleset


def restrict_with(ruleset: int) -> None:
    """Add a prebuilt ruleset as a layer of this process's domain."""
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    _check(_libc.syscall(_SYS_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)), "landlock_restrict_self (net)")


def confine_and_exec(argv: list[str]) -> None:
    policy = json.loads(os.environ.pop(POLICY_ENV))
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    if policy.get("oom_score_adj") is not None:
        try:  # raising it needs no privilege: under memory pressure the kernel kills a cell first
            with open("/proc/self/oom_score_adj", "w") as adj:
                adj.write(str(policy["oom_score_adj"]))
        except OSError:
            pass
    program = _which(argv[0])  # before confining: this interpreter's own files may be hidden after
    drop_capabilities()
    net = policy.get("net_ruleset_fd")
    if net is not None:
        restrict_with(int(net))
        os.close(int(net))
    restrict(policy["read"], policy["write"], abi=policy.get("abi"))
    os.execv(program, argv)


def _which(name: str) -> str:
    if "/" in name:
        return name
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(2, f"{name}: command not found on PATH")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        sys.exit("usage: landlock.py -- COMMAND [ARGS...]  (policy in $%s)" % POLICY_ENV)
    try:
        confine_and_exec(args)
    except (OSError, ValueError, KeyError) as exc:
        # Never run the command unconfined: fail, loudly.
        print(f"reactor-confine: refusing to run {args[0]!r} unconfined: {exc}", file=sys.stderr)
        sys.exit(126)
