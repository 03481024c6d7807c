"""`opencode serve` processes: one per cell, its working directory the cell's worktree, used
only once its health check answers, and killed with its whole process group.

A server gets its configuration through the environment (OPENCODE_CONFIG_CONTENT: nothing is
written into the worktree, where it would be committed), a random per-cell password, and a
state directory of its own: XDG data/state/config/cache, HOME and TMPDIR all live there, so a
confined cell has somewhere to write and nothing of another cell's to read.

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
import shlex
import shutil
import signal
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from reactor import OPENCODE_VERSION
from reactor.errors import ConfigurationError, ReactorError
from reactor.infra.confinement import CellPolicy
from reactor.infra.processes import Owner, find_marked_processes, kill_process_group, marker_env

log = logging.getLogger(__name__)

LISTENING_LINE = "opencode server listening on"
HEALTH_PATH = "/global/health"

# What a server inherits from our environment when it must not see the rest of it (the
# operator's). Secrets reach a server only through ServerSpec.env.
_PASSTHROUGH_ENV = ("PATH", "USER", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR",
                    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
                    "NPM_CONFIG_REGISTRY", "npm_config_registry", "NODE_EXTRA_CA_CERTS")
# Never handed down even when inheriting: they belong to Reactor, not to the agent.
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
    state_dir: Path  # per cell: XDG data/state/config/cache, HOME, TMPDIR, logs
    work_dir: Path
    config: dict = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # the task's secrets (API keys); never logged
    inherit_env: bool = True  # False in the operator: the server sees only _PASSTHROUGH_ENV + env
    owner: Owner = field(default_factory=Owner.current)
    seed_dir: Path | None = None  # a finished install of OpenCode's plugin package (read-only)
    confinement: CellPolicy | None = None  # None: unconfined (only with --allow-unconfined)


class OpenCodeServer:
    def __init__(self, spec: ServerSpec):
        self.spec = spec
        self.password = secrets.token_urlsafe(24)
        self._process: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task | None = None
        self._listening = asyncio.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.spec.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def log_path(self) -> Path:
        return self.spec.state_dir / "server.log"

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
        env = self.environment()
        pass_fds: tuple[int, ...] = ()
        if spec.confinement is not None:
            argv = spec.confinement.wrap(argv)
            env.update(spec.confinement.launcher_env(network=True))
            pass_fds = spec.confinement.pass_fds
        with open(self.log_path, "ab") as log_file:
            self._process = await asyncio.create_subprocess_exec(
                *argv, cwd=spec.cwd, env=env, pass_fds=pass_fds,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log_file,
                start_new_session=True,  # its own process group, so stop() ends its children too
            )
        self._pump = asyncio.create_task(self._pump_stdout(), name=f"opencode-stdout-{spec.cell_id}")
        try:
            await self._wait_healthy(started + timeout)
        except BaseException:
            await self.stop(grace=1.0)
            raise
        log.debug("cell %s: server pid %s healthy on port %s in %.2fs",
                  spec.cell_id, self.pid, spec.port, time.monotonic() - started)

    def _prepare_state_dir(self) -> None:
        state = self.spec.state_dir
        for name in ("home", "tmp", "data", "state", "cache"):
            (state / name).mkdir(parents=True, exist_ok=True)
        # OpenCode's shells take their environment from a login shell, whose /etc/profile
        # resets PATH: the cell's own profile puts back the PATH the server was given (the
        # toolchains), as the user's own profile did when HOME was theirs.
        path = self.environment().get("PATH", os.defpath)
        profile = f"PATH={shlex.quote(path)}\nexport PATH\n"
        for name in (".profile", ".bash_profile"):
            (state / "home" / name).write_text(profile)
        config = state / "config" / "opencode"
        config.mkdir(parents=True, exist_ok=True)
        seed = self.spec.seed_dir
        if seed is not None and not (config / "node_modules").exists():
            for name in ("package.json", "package-lock.json"):
                shutil.copyfile(seed / name, config / name)
            (config / "node_modules").symlink_to(seed / "node_modules")

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

    async def _pump_stdout(self) -> None:
        """Copy the server's stdout to its log file, noticing the listening line."""
        assert self._process is not None and self._process.stdout is not None
        with open(self.log_path, "ab") as log_file:
            async for line in self._process.stdout:
                log_file.write(line)
                log_file.flush()
                if not self._listening.is_set() and LISTENING_LINE.encode() in line:
                    self._listening.set()

    def alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL after ``grace`` seconds: no process of the cell
        outlives it. Idempotent."""
        process = self._process
        if process is None:
            return
        pgid = process.pid  # leader of its own session: pgid == pid
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace)
            except asyncio.TimeoutError:
                log.debug("cell %s: server pid %s still running %.1fs after SIGTERM; killing", self.spec.cell_id, pgid, grace)
        # Whatever is left of the group (children that outlived the leader) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        await process.wait()
        await asyncio.to_thread(self._kill_escaped)
        if self._pump is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._pump, 1.0)
            self._pump = None

    def _kill_escaped(self) -> None:
        """Shells the agent or a test started run in sessions of their own, outside the
        server's group; they carry this cell's markers, so end them by those."""
        spec = self.spec
        for leftover in find_marked_processes(str(spec.work_dir), spec.cell_id):
            if leftover.owner == spec.owner.token:
                log.debug("cell %s: ending escaped process %s %s", spec.cell_id, leftover.pid, leftover.command[:2])
                kill_process_group(leftover.pid, grace=1.0)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"
