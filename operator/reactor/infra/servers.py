"""`opencode serve` processes: one per cell, its working directory the cell's worktree, used
only once its health check answers, and killed with its whole process group.

A server gets its configuration through the environment (OPENCODE_CONFIG_CONTENT: nothing is
written into the worktree, where it would be committed), a random per-cell password, and a
state directory of its own: XDG data/state/config/cache, HOME and TMPDIR all live there, so a
confined cell has somewhere to write and nothing of another cell's to read.

The state dir is the cell's: the operator writes there only through ``safefs`` (no link a
cell planted is followed, no existing file is written through) and keeps nothing of its own
there. The server's output reaches the operator through pipes and goes to a log in the
operator's private dir (``ServerSpec.log_path``), never to a file in the state dir.

Its config dir is pre-seeded with OpenCode's plugin package (package.json, lockfile and a
symlink to one shared, read-only node_modules): otherwise each cell's first session starts a
background `npm install` (~64 MB per cell, a network fetch), and npm swallows SIGTERM while it
unpacks, so the cell ignores a stop for seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import select
import shlex
import shutil
import signal
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from reactor import OPENCODE_VERSION
from reactor.errors import ConfigurationError, ReactorError
from reactor.infra import landlock, launcher, safefs
from reactor.infra.cellrecords import LiveCell, start_ticks
from reactor.infra.confinement import CellPolicy
from reactor.infra.processes import Owner, find_marked_processes, kill_process_group, marker_env

log = logging.getLogger(__name__)

LISTENING_LINE = "opencode server listening on"
LOG_LIMIT = 4 << 20  # bytes of a server's output kept in its log (the rest is read and dropped)
HEALTH_PATH = "/global/health"
_TAIL_BYTES = 64 << 10  # of a server's log quoted in a boot error (its last lines)

# What a server inherits from our environment when it must not see the rest of it (the
# operator's). Secrets reach a server only through ServerSpec.env.
_PASSTHROUGH_ENV = ("PATH", "USER", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR",
                    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
                    "NPM_CONFIG_REGISTRY", "npm_config_registry", "NODE_EXTRA_CA_CERTS")
# Never handed down even when inheriting: they belong to Reactor, not to the agent.
# How long the server has to end on SIGTERM before the launcher kills every process of the cell.
STOP_TERM_GRACE = 0.2
# How long the launcher may then take to kill and reap the rest before the operator does it.
_REAPER_SLACK = 2.0
_WITHHELD_ENV = ("KUBECONFIG", "OPENCODE_SERVER_PASSWORD", "OPENCODE_SERVER_USERNAME", "OPENCODE_CONFIG_CONTENT")


def keep_session_store(state_dir: Path) -> bool:
    """Before a cell's server is started again on a state dir an earlier server wrote (an
    operator killed mid-task): keep OpenCode's data (``data/opencode``: its sessions, which
    the new server loads, confined) and make everything else anew. True when there was a
    store to keep.

    The old state dir is the cell's writing: nothing in it is read or followed by us. It is
    renamed aside (its parent is Reactor's), the one directory entry moved by name relative to
    directory descriptors opened with O_NOFOLLOW (a symlink planted for ``data`` or
    ``data/opencode`` is refused, not followed), and the rest removed (rmtree does not follow
    links). No process of the cell runs meanwhile (the caller killed them by marker)."""
    old = state_dir.with_name(state_dir.name + ".previous")
    shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(state_dir, old)
    except FileNotFoundError:
        return False
    state_dir.mkdir(mode=0o700)
    kept = False
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        source = os.open(old / "data", flags)
        try:
            if stat.S_ISDIR(os.stat("opencode", dir_fd=source, follow_symlinks=False).st_mode):
                (state_dir / "data").mkdir(mode=0o700)
                target = os.open(state_dir / "data", flags)
                try:
                    os.rename("opencode", "opencode", src_dir_fd=source, dst_dir_fd=target)
                    kept = True
                finally:
                    os.close(target)
        finally:
            os.close(source)
    except OSError as exc:  # absent, or a symlink (ELOOP/ENOTDIR): nothing kept
        log.warning("state dir %s: OpenCode's data not kept: %s", state_dir, exc)
    finally:
        shutil.rmtree(old, ignore_errors=True)
    return kept


class ServerBootError(ReactorError):
    """The server did not become healthy (it exited, timed out, or failed its health check)."""


def find_opencode_binary(explicit: str | None = None) -> str:
    """--opencode-bin, then $REACTOR_OPENCODE_BIN, then `opencode` on PATH."""
    for candidate in (explicit, os.environ.get("REACTOR_OPENCODE_BIN")):
        if candidate:
            if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
                raise ConfigurationError(f"opencode binary {candidate} does not exist or is not executable")
            return candidate
    found = shutil.which("opencode")
    if not found:
        raise ConfigurationError(
            f"no opencode binary: run `make opencode` (installs opencode-ai@{OPENCODE_VERSION} into .tools/) "
            "or set REACTOR_OPENCODE_BIN"
        )
    return found


@dataclass
class ServerSpec:
    binary: str
    cwd: Path  # the worktree: the agent works in its own checkout
    port: int
    cell_id: str
    state_dir: Path  # per cell, cell-writable: XDG data/state/config/cache, HOME, TMPDIR
    work_dir: Path
    # The server's output, operator-private (default: beside the state dir, not in it).
    log_path: Path | None = None
    config: dict = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # the task's secrets (API keys); never logged
    inherit_env: bool = True  # False in the operator: the server sees only _PASSTHROUGH_ENV + env
    owner: Owner = field(default_factory=Owner.current)
    seed_dir: Path | None = None  # a finished install of OpenCode's plugin package (read-only)
    confinement: CellPolicy | None = None  # None: unconfined (only with --allow-unconfined)
    # Seconds the cell may run on should the operator die (--cells-outlive-operator), to be
    # reattached by the next one: its launcher then gets no parent-death signal but this
    # deadline, and writes its output straight to the log file (a pipe would die with the
    # operator). None: the cell ends with the operator.
    outlive_deadline: float | None = None


class OpenCodeServer:
    def __init__(self, spec: ServerSpec):
        self.spec = spec
        self.password = secrets.token_urlsafe(24)
        self._process: asyncio.subprocess.Process | None = None
        self._live: LiveCell | None = None  # a cell an earlier operator started (attach())
        # The launcher's start time (infra/cellrecords.py), read right after the spawn: read
        # later, its pid could have been reused by then and the record name another process.
        self.launcher_start: int | None = None
        # Carried by the launcher's "swept" line (the launch config, a memfd the cell never
        # sees): the cell writes the same output and could print that line itself.
        self.sweep_token = secrets.token_hex(12)
        self._pump: asyncio.Task | None = None
        self._listening = asyncio.Event()
        self._swept = asyncio.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.spec.port}"

    @property
    def pid(self) -> int | None:
        """The cell launcher's pid (the server is its child)."""
        if self._live is not None:
            return self._live.record.launcher_pid
        return self._process.pid if self._process else None

    @property
    def log_path(self) -> Path:
        spec = self.spec
        return spec.log_path or spec.state_dir.with_name(spec.state_dir.name + ".server.log")

    def environment(self) -> dict[str, str]:
        spec = self.spec
        if spec.inherit_env:
            base = {k: v for k, v in os.environ.items() if k not in _WITHHELD_ENV and not k.startswith("REACTOR_")}
        else:
            base = {k: os.environ[k] for k in _PASSTHROUGH_ENV if k in os.environ}
        return {
            **base,
            **spec.env,
            "HOME": str(spec.state_dir / "home"),
            "TMPDIR": str(spec.state_dir / "tmp"),  # OpenCode's shell endpoint writes there
            "XDG_DATA_HOME": str(spec.state_dir / "data"),
            "XDG_STATE_HOME": str(spec.state_dir / "state"),
            "XDG_CONFIG_HOME": str(spec.state_dir / "config"),
            "XDG_CACHE_HOME": str(spec.state_dir / "cache"),
            # A build cache shared between cells would be a channel between them.
            "GOCACHE": str(spec.state_dir / "cache" / "go-build"),
            "OPENCODE_CONFIG_CONTENT": json.dumps(spec.config),
            "OPENCODE_SERVER_PASSWORD": self.password,
            "OPENCODE_DISABLE_AUTOUPDATE": "1",
            # No fetch of the models.dev catalogue: a cell talks to its configured provider
            # and nothing else (and where that host is unreachable the fetch can stall turns).
            "OPENCODE_DISABLE_MODELS_FETCH": "1",
            # The repository's own opencode.json and .opencode/ (plugins, agents, permissions)
            # are tenant code in the server we test through: never loaded (measured: without
            # this a repository's opencode.json is in the server's config).
            "OPENCODE_DISABLE_PROJECT_CONFIG": "1",
            **marker_env(spec.cell_id, spec.owner, str(spec.work_dir)),
        }

    async def start(self, timeout: float = 10.0) -> None:
        """Spawn the server and return once GET /global/health answers 200 (never used before)."""
        spec = self.spec
        if not spec.cwd.is_dir():
            raise ServerBootError(f"worktree {spec.cwd} does not exist")
        self._prepare_state_dir()
        started = time.monotonic()
        argv = [spec.binary, "serve", "--port", str(spec.port), "--hostname", "127.0.0.1"]
        launch = await asyncio.to_thread(self._launch, argv)  # may wait for the cell's TCP ruleset
        output: int = asyncio.subprocess.PIPE
        offset = 0
        if spec.outlive_deadline is not None:  # to the log itself: the cell may outlive our pipes
            output = self._open_log(os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            offset = os.fstat(output).st_size
        try:
            self._process = await asyncio.create_subprocess_exec(
                *launch.argv, cwd=spec.cwd, env=launch.env, pass_fds=launch.pass_fds,
                stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=output,
                start_new_session=True,  # its own process group: the fallback of stop()
            )
        finally:
            launch.close()
            if output != asyncio.subprocess.PIPE:
                os.close(output)
        self.launcher_start = start_ticks(self._process.pid)  # our unreaped child: still the launcher
        self._pump = asyncio.create_task(self._pump_output() if output == asyncio.subprocess.PIPE
                                         else self._tail_log(offset), name=f"opencode-output-{spec.cell_id}")
        try:
            await self._wait_healthy(started + timeout)
        except BaseException:
            await self.stop(grace=1.0)
            raise
        log.debug("cell %s: server pid %s healthy on port %s in %.2fs",
                  spec.cell_id, self.pid, spec.port, time.monotonic() - started)

    def _launch(self, argv: list[str]) -> launcher.Launch:
        """The server runs under the cell launcher: its subreaper, outside the cell, and in
        it the server confined (when a policy is set). The launcher's own environment is
        fixed (the markers, so a crashed run's cells are found); the server's (the task's
        secrets) reaches only the confined exec."""
        spec, policy, fds = self.spec, None, ()
        if spec.confinement is not None:
            net = spec.confinement.net.take(spec.port) if spec.confinement.net is not None else None
            fds = () if net is None else (net,)
            policy = spec.confinement.launch_policy(net_ruleset_fd=net)
        return launcher.prepare(argv, self.environment(), policy, term_grace=STOP_TERM_GRACE,
                                launcher_env=marker_env(spec.cell_id, spec.owner, str(spec.work_dir)), extra_fds=fds,
                                deadline=spec.outlive_deadline, parent_death=spec.outlive_deadline is None,
                                sweep_token=self.sweep_token)

    @classmethod
    async def attach(cls, spec: ServerSpec, live: LiveCell, timeout: float = 5.0) -> OpenCodeServer | None:
        """Take over a running cell an earlier operator started (``live``: its launcher,
        proven by pid and start time and held by a pidfd; ``spec``: the same cell). None
        when its server does not answer its health check with the recorded password; the
        caller then stops it (``stop()`` of the returned-None case: ``kill_live``)."""
        server = cls(spec)
        server.password, server._live = live.record.password, live
        server.launcher_start, server.sweep_token = live.record.launcher_start, live.record.sweep_token
        try:
            offset = os.stat(server.log_path, follow_symlinks=False).st_size
        except OSError:
            offset = 0
        # The password goes only to a listener that is a process of this cell: a server that
        # no longer listens leaves its port to whoever binds it next (fourth review).
        healthy = await asyncio.to_thread(_listens_in_cell, live.record.launcher_pid, spec.port)
        if healthy:
            async with httpx.AsyncClient(auth=("opencode", server.password), timeout=timeout) as http:
                try:
                    response = await http.get(server.base_url + HEALTH_PATH)
                    healthy = response.status_code == 200 and response.json().get("healthy") is True
                except (httpx.HTTPError, ValueError):
                    healthy = False
        if not healthy or not server.alive():
            server._live = None  # not ours to keep: the caller kills it with kill_live
            return None
        server._listening.set()
        server._pump = asyncio.create_task(server._tail_log(offset), name=f"opencode-output-{spec.cell_id}")
        return server

    def _open_log(self, flags: int) -> int:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.log_path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    def _prepare_state_dir(self) -> None:
        """Lay out the state dir. On a restart the cell had it to itself: every entry written
        here is replaced, not written through (see safefs), and the state dir itself is made
        by the operator, in a directory the cell cannot write."""
        state = self.spec.state_dir
        state.mkdir(parents=True, exist_ok=True)
        safefs.make_dirs(state, "home", "tmp", "data", "state", "cache", "config/opencode")
        # OpenCode's shells take their environment from a login shell, whose /etc/profile
        # resets PATH: the cell's own profile puts back the PATH the server was given (the
        # toolchains), as the user's own profile did when HOME was theirs.
        path = self.environment().get("PATH", os.defpath)
        profile = f"PATH={shlex.quote(path)}\nexport PATH\n".encode()
        for name in (".profile", ".bash_profile"):
            safefs.replace_file(state, f"home/{name}", profile)
        seed = self.spec.seed_dir
        if seed is not None:
            for name in ("package.json", "package-lock.json"):
                safefs.replace_file(state, f"config/opencode/{name}", (seed / name).read_bytes())
            safefs.replace_symlink(state, "config/opencode/node_modules", seed / "node_modules")

    async def _wait_healthy(self, deadline: float) -> None:
        assert self._process is not None
        listening = asyncio.create_task(self._listening.wait())
        exited = asyncio.create_task(self._process.wait())
        done: set[asyncio.Task] = set()  # stays empty when the wait is cancelled (task deleted mid-boot)
        try:
            done, _ = await asyncio.wait({listening, exited}, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            listening.cancel()
            if exited not in done:
                exited.cancel()
        if exited in done:
            if self._pump is not None:  # its last words, before quoting them
                await asyncio.wait({self._pump}, timeout=1.0)
            raise ServerBootError(
                f"opencode serve exited with code {self._process.returncode} before listening on port "
                f"{self.spec.port}:\n{self.log_tail()}"
            )
        if listening not in done:
            raise ServerBootError(f"opencode serve did not listen on port {self.spec.port} in time:\n{self.log_tail()}")
        # The line says the socket is open; confirm the API answers (and our password works).
        async with httpx.AsyncClient(auth=("opencode", self.password), timeout=2.0) as http:
            while True:
                try:
                    response = await http.get(self.base_url + HEALTH_PATH)
                    if response.status_code == 200 and response.json().get("healthy"):
                        return
                    failure = f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    failure = type(exc).__name__
                if time.monotonic() >= deadline:
                    raise ServerBootError(f"health check of port {self.spec.port} failed: {failure}")
                await asyncio.sleep(0.02)

    async def _pump_output(self) -> None:
        """Copy the server's stdout and stderr to its log (the operator's file, opened without
        following links, at most LOG_LIMIT bytes per server), noticing the listening line and
        the launcher's word that it swept the cell."""
        process = self._process
        assert process is not None and process.stdout is not None and process.stderr is not None
        fd = self._open_log(os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        written = 0

        async def copy(stream: asyncio.StreamReader, watch: bool) -> None:
            # Chunks, not lines: a line longer than the reader's limit must not stop the copy
            # (the server would then block on a full pipe).
            nonlocal written
            recent = b""
            while chunk := await stream.read(1 << 16):
                if written < LOG_LIMIT:
                    written += os.write(fd, chunk[:LOG_LIMIT - written])
                if watch:
                    recent = self._watch(recent, chunk)

        try:
            # Both copies end before the file is closed (return_exceptions: one failing must
            # not leave the other writing to a closed, maybe reused, descriptor).
            await asyncio.gather(copy(process.stdout, True), copy(process.stderr, False), return_exceptions=True)
        finally:
            os.close(fd)

    def _watch(self, recent: bytes, chunk: bytes) -> bytes:
        """Notice the listening line and the launcher's word that it swept the cell: its line
        with this launch's token (the cell writes the same output; a cell started before
        records held a token has none). Looked for in the whole chunk, then its end kept (a
        line split across reads)."""
        window = recent + chunk
        if not self._listening.is_set() and LISTENING_LINE.encode() in window:
            self._listening.set()
        swept = f"{landlock.SWEPT_LINE} {self.sweep_token} " if self.sweep_token else landlock.SWEPT_LINE
        if swept.encode() in window:
            self._swept.set()
            return b""
        return window[-4096:]

    async def _tail_log(self, offset: int) -> None:
        """A cell that may outlive the operator writes its output to the log itself (no cap:
        see docs/security.md); follow it from ``offset`` for the same two lines.

        The cell writes the file: it may flood it, or hold a lease on it (it runs as our
        user). Opened without waiting on a lease (a leased log is not followed: the cell's
        sweep then times out), and read one chunk per turn of the event loop, never all there
        is at once: either would stop every other task of the operator."""
        try:
            fd = self._open_log(os.O_RDONLY | os.O_NONBLOCK)
        except BlockingIOError:
            log.warning("cell %s: its log is leased by the cell; not followed", self.spec.cell_id)
            return
        recent = b""
        try:
            while True:
                chunk = os.pread(fd, 1 << 16, offset)
                if chunk:
                    offset += len(chunk)
                    recent = self._watch(recent, chunk)
                    await asyncio.sleep(0)
                elif not self.alive():
                    return
                else:
                    await asyncio.sleep(0.05)
        finally:
            os.close(fd)

    def _signal(self, signum: int) -> None:
        """Signal the launcher: through the pidfd when it is an attached cell's (never by a
        pid number that could have been reused)."""
        if self._live is not None:
            signal.pidfd_send_signal(self._live.pidfd, signum)
        elif self._process is not None:
            os.kill(self._process.pid, signum)

    async def sweep(self, timeout: float = 10.0) -> None:
        """Kill every process of the cell but the server itself (shells, daemons the agent
        started, escaped or not): the launcher does it and says so on the server's stdout."""
        if not self.alive():
            return
        self._swept.clear()
        began = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            self._signal(signal.SIGUSR1)
        try:
            await asyncio.wait_for(self._swept.wait(), timeout)
            log.debug("cell %s: swept in %.3fs", self.spec.cell_id, time.monotonic() - began)
        except asyncio.TimeoutError:
            raise ReactorError(f"the launcher of cell {self.spec.cell_id} did not end the cell's other "
                                  f"processes within {timeout:g}s") from None

    def alive(self) -> bool:
        if self._live is not None:
            return self._live.pidfd >= 0 and not _pidfd_exited(self._live.pidfd)
        return self._process is not None and self._process.returncode is None

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the cell's launcher: it ends the server, then kills every process of the
        cell, escaped or not, and exits. If it has not after the server's grace and ``grace``
        more seconds (at least _REAPER_SLACK), SIGKILL the group and sweep by markers
        (no process of the cell outlives it). Idempotent."""
        if self._live is not None:
            await self._stop_attached(grace)
            return
        process = self._process
        if process is None:
            return
        pgid = process.pid  # leader of its own session: pgid == pid
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), STOP_TERM_GRACE + max(grace, _REAPER_SLACK))
            except asyncio.TimeoutError:
                log.warning("cell %s: launcher pid %s still running %.1fs after SIGTERM; killing its group",
                            self.spec.cell_id, pgid, STOP_TERM_GRACE + max(grace, _REAPER_SLACK))
        if process.returncode is None or process.returncode < 0:
            # The launcher hung or was killed (a cell can signal it where the kernel does not
            # scope signals, ABI < 6): its cell's processes may be left; end them the old way.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            await process.wait()
            await asyncio.to_thread(self._kill_escaped)
        if self._pump is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._pump, 1.0)
            self._pump = None

    async def _stop_attached(self, grace: float) -> None:
        """stop() of a cell an earlier operator started: not our child, so it is waited on
        and signalled through its pidfd."""
        live = self._live
        assert live is not None
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
            self._pump = None
        await kill_live(live, grace, self.spec.work_dir)
        self._live = None

    def _kill_escaped(self) -> None:
        """Shells the agent or a test started run in sessions of their own, outside the
        server's group; they carry this cell's markers, so end them by those."""
        spec = self.spec
        for leftover in find_marked_processes(str(spec.work_dir), spec.cell_id):
            if leftover.owner == spec.owner.token:
                log.debug("cell %s: ending escaped process %s %s", spec.cell_id, leftover.pid, leftover.command[:2])
                kill_process_group(leftover.pid, grace=1.0)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the server printed (from the operator's own log file). Only its
        end is read: a cell that may outlive the operator writes the file itself, uncapped."""
        try:
            fd = os.open(self.log_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)  # no lease waited on
            try:
                size = os.fstat(fd).st_size
                text = os.pread(fd, _TAIL_BYTES, max(0, size - _TAIL_BYTES)).decode(errors="replace")
            finally:
                os.close(fd)
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"


_LISTENER_SEARCH = 64  # processes looked at, nearest the launcher first: the server is at the top


def _listens_in_cell(launcher_pid: int, port: int) -> bool:
    """Whether what listens on 127.0.0.1:``port`` is a process of the cell whose launcher
    (already proven, held by a pidfd) is ``launcher_pid``: its command (the oldest child:
    everything else of the cell descends from it) or what that started holds the listening
    socket. A bounded search: a cell of many processes must not hold the operator's thread."""
    try:
        children = psutil.Process(launcher_pid).children()
        queue = [min(children, key=lambda p: p.create_time())] if children else []
    except psutil.Error:
        return False
    for _ in range(_LISTENER_SEARCH):
        if not queue:
            break
        process = queue.pop(0)
        try:
            sockets = process.net_connections(kind="tcp")
            queue.extend(process.children())
        except psutil.Error:
            continue
        if any(s.status == psutil.CONN_LISTEN and s.laddr.port == port
               and s.laddr.ip in ("127.0.0.1", "0.0.0.0", "::", "::ffff:127.0.0.1") for s in sockets):
            return True
    return False


def kill_marked(work_dir: Path, cell_id: str, owner: str) -> None:
    """The process groups carrying ``cell_id``'s markers and started by ``owner``."""
    for leftover in find_marked_processes(str(work_dir), cell_id):
        if leftover.owner == owner:
            kill_process_group(leftover.pid, grace=1.0)


def _pidfd_exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


async def kill_live(live: LiveCell, grace: float, work_dir: Path) -> None:
    """Stop an attached (or not reattachable) cell's launcher through its pidfd, as stop()
    does a child's: SIGTERM (it ends the server, then every process of the cell), SIGKILL if
    it has not exited in time, then whatever carries the cell's markers and the recorded
    owner (``work_dir``: the markers'). Closes the pidfd."""
    pid = live.record.launcher_pid
    try:
        if not _pidfd_exited(live.pidfd):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(live.pidfd, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TERM_GRACE + max(grace, _REAPER_SLACK)
            while not _pidfd_exited(live.pidfd) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if not _pidfd_exited(live.pidfd):
                log.warning("cell %s: launcher pid %s still running after SIGTERM; killing it and its group",
                            live.record.cell_id, pid)
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(live.pidfd, signal.SIGKILL)
                    os.killpg(pid, signal.SIGKILL)  # still ours: the pidfd says it has not exited
        # Whatever of the cell the launcher did not end (it was itself killed, say).
        await asyncio.to_thread(kill_marked, work_dir, live.record.cell_id, live.record.owner)
    finally:
        live.close()
