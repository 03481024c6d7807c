"""A cell: one task's worktree, port, `opencode serve` process, client and session."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from typing import Any

from reactor.infra.cellrecords import CellRecord, LiveCell, start_ticks
from reactor.infra.confinement import CellPolicy, policy_fingerprint
from reactor.infra.ports import PortTaken
from reactor.infra.processes import Owner
from reactor.infra.servers import OpenCodeServer, ServerBootError, ServerSpec, keep_session_store, kill_live
from reactor.infra.worktrees import Worktree, safe_component
from reactor.opencode.client import OpenCodeClient
from reactor.opencode.events import EventFollower, EventHub
from reactor.workflow.engine import Engine
from reactor.workflow.types import CellInfo, TaskSpec, Usage

log = logging.getLogger(__name__)

# A cell that may outlive its operator (--cells-outlive-operator) is ended by its launcher
# this long after the task's time box (which covers the agent's turn and the tests).
OUTLIVE_SLACK = 15.0


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class Cell:
    def __init__(self, spec: TaskSpec, engine: Engine, cell_id: str | None = None):
        self.spec = spec
        self.engine = engine
        self.cell_id = cell_id or spec.task_id
        self.port: int | None = None
        self.worktree: Worktree | None = None
        self.server: OpenCodeServer | None = None
        self.client: OpenCodeClient | None = None
        # The cell's OpenCode events, for the task's whole life (across server restarts):
        # consumers subscribe here once; each server gets a follower feeding it.
        self.events = EventHub(self.cell_id)
        self._follower: EventFollower | None = None
        self.session_id: str | None = None
        self.boot_attempts = 0
        # BOOT_RETRY, counted once per task: failed boots and servers lost mid-task draw on
        # the same restarts (2, the design's budget), so a task boots at most 3 times in all.
        self.restarts_left = engine.settings.recovery.boot_restarts
        self.spent = Usage()  # usage of sessions already left behind (R3 retries)
        self.state_dir = engine.cells_dir / safe_component(self.cell_id)
        self.start_commit: str | None = None  # None: the base branch's tip
        # Resuming a task an operator killed mid-turn: the session to reopen (set before the
        # server starts); what happened ("reopened", "restarted") once it has started.
        self.reopen_session: str | None = None
        self.resumed: str | None = None
        self.next_prompt: str | None = None  # the first message when it is not spec.prompt (a resume)
        # A running cell an earlier operator started, proven to be it, to reattach to (set
        # before the server starts; reopened instead when it does not answer).
        self.live: LiveCell | None = None
        self.following = False  # reattached mid-turn: the first turn is followed, not prompted
        self.policy: CellPolicy | None = None  # the cell's Landlock rules (None: unconfined)
        # When the task's time box ends (time.monotonic()): git in the checkout is killed then.
        self.box_end: float | None = None
        self.tested: dict[str, str | None] = {}  # the changed files as they were when tested

    def info(self) -> CellInfo:
        return CellInfo(
            port=self.port,
            worktree=str(self.worktree.path) if self.worktree else None,
            server_pid=self.server.pid if self.server else None,
            session_id=self.session_id,
            start_commit=self.worktree.base_commit if self.worktree else None,
        )

    def opencode_config(self) -> dict[str, Any]:
        config = deep_merge(self.engine.settings.base_opencode_config, self.spec.opencode_config)
        if self.spec.model:
            config["model"] = self.spec.model
        return config

    # -- bootstrap --

    async def create_worktree(self) -> Worktree:
        spec = self.spec
        if self.engine.confinement.port_rulesets is not None:
            self.engine.confinement.port_rulesets.prepare()  # the server's TCP ruleset, built meanwhile
        self.worktree = await asyncio.to_thread(
            self.engine.worktrees.create, spec.repo, spec.task_id, spec.base_branch, spec.branch, self.cell_id,
            self.start_commit, spec.replaces,
        )
        self.policy = await asyncio.to_thread(self._confinement_policy)
        # Git in the checkout from now on: under the cell's launcher, with a deadline per step,
        # and with no TCP at all (it needs none).
        self.worktree.confine(self.policy.launch_policy(no_tcp=True) if self.policy is not None else None,
                              git_deadline=self.engine.settings.git_step_timeout)
        return self.worktree

    async def adopt_worktree(self) -> Worktree | None:
        """Take over the checkout an earlier, killed run of this cell left (with the agent's
        changes as they were), keeping OpenCode's session store of its state dir (unless its
        server still runs, to be reattached). None when there is no checkout to take over."""
        worktree = await asyncio.to_thread(self.engine.worktrees.adopt, self.cell_id)
        if worktree is None:
            return None
        self.worktree = worktree
        self.start_commit = worktree.base_commit
        if self.live is None and not await asyncio.to_thread(keep_session_store, self.state_dir):
            self.reopen_session = None  # nothing to reopen it from: a fresh session on the checkout
        self.policy = await asyncio.to_thread(self._confinement_policy)
        # The checkout was the cell's: git in it only under the launcher, as in create_worktree.
        self.worktree.confine(self.policy.launch_policy(no_tcp=True) if self.policy is not None else None,
                              git_deadline=self.engine.settings.git_step_timeout)
        return self.worktree

    def _confinement_policy(self) -> CellPolicy | None:
        """The cell writes its checkout and its state dir, and reads the objects its
        checkout borrows from the source repository (not the source's refs, config or hooks)."""
        confinement = self.engine.confinement
        if not confinement.enabled:
            return None
        assert self.worktree is not None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return confinement.cell_policy(writable=[self.worktree.path, self.state_dir],
                                       readable=[self.worktree.source_objects],
                                       path_env=os.environ.get("PATH", os.defpath))

    async def start_server(self) -> None:
        """Start the server and open a session; BOOT_RETRY: on failure kill it and start
        again while restarts are left (linear backoff, a fresh port each time)."""
        policy = self.engine.settings.recovery
        if self.live is not None:
            if await self._reattach():
                return
            if not await asyncio.to_thread(keep_session_store, self.state_dir):
                self.reopen_session = None
        while True:
            self.boot_attempts += 1
            try:
                async with self.engine.starting:  # the health timeout then times one start, not a queue
                    await self._boot_once()
                return
            except ServerBootError as exc:
                await self.stop_server()
                self._release_port()
                if not self.restarts_left:
                    raise
                self.restarts_left -= 1
                log.warning("BOOT_RETRY: %s: server failed to boot (attempt %d, %d restarts left): %s",
                            self.cell_id, self.boot_attempts, self.restarts_left, str(exc).splitlines()[0])
                await asyncio.sleep(policy.boot_delay * self.boot_attempts)

    def _server_spec(self, owner: Owner, outlive_deadline: float | None = None) -> ServerSpec:
        assert self.worktree is not None and self.port is not None
        settings = self.engine.settings
        return ServerSpec(
            binary=self.engine.opencode_bin,
            cwd=self.worktree.path,
            port=self.port,
            cell_id=self.cell_id,
            state_dir=self.state_dir,
            log_path=self.engine.files.cell_log(self.cell_id),
            work_dir=self.engine.work_dir,
            seed_dir=self.engine.seed_dir,
            confinement=self.policy,
            config=self.opencode_config(),
            env={**settings.server_env, **self.spec.env},
            inherit_env=settings.inherit_env,
            owner=owner,
            outlive_deadline=outlive_deadline,
        )

    async def _follow_events(self) -> None:
        assert self.server is not None
        # The client knows only http://127.0.0.1:PORT and the cell's password: the cell is
        # reached through its own server's API and nothing else.
        self.client = OpenCodeClient(self.server.base_url, self.server.password)
        try:
            # Subscribed before the first prompt, so no event of the task is missed.
            self._follower = EventFollower(self.client, self.events)
            await self._follower.start()
        except Exception as exc:
            raise ServerBootError(f"server on port {self.port} is healthy but its event stream failed: {exc}") from exc

    async def _reattach(self) -> bool:
        """Take over the running server of ``self.live`` (an earlier operator's, proven by
        pid and start time): it must answer its health check with the recorded password and
        know the session. True: reattached (``resumed`` = "reattached", no message sent);
        False: it was stopped, every process of it, and the caller reopens the session."""
        live, self.live = self.live, None
        assert live is not None and self.worktree is not None
        live.taken = True
        record = live.record
        owner = Owner.from_token(record.owner)  # its markers name the operator that started it
        if record.policy != policy_fingerprint(self.policy):
            # Its Landlock domain is the kernel's and cannot be changed: a cell confined by other
            # rules than this operator's (restarted with stricter flags, or no longer
            # --allow-unconfined) is not taken over; it is stopped and its session reopened.
            log.warning("%s: its running cell was confined otherwise than this operator confines cells: "
                        "stopping it, reopening the session", self.cell_id)
            self.live = live
            await self.drop_live()
            return False
        try:
            self.port = self.engine.ports.reserve(record.port, owner=self.cell_id)
        except PortTaken as exc:  # another cell got it while it was free: not this cell's server there
            log.warning("%s: cannot reattach: %s; stopping its cell, reopening the session", self.cell_id, exc)
            self.live = live
            await self.drop_live()
            return False
        spec = self._server_spec(owner, max(1.0, record.deadline_at - time.time()))  # its launcher's deadline
        server = await OpenCodeServer.attach(spec, live)
        session = None
        if server is not None:
            self.server = server
            try:
                await self._follow_events()
                assert self.client is not None
                session = await self.client.get_session(self.reopen_session or record.session_id)
            except Exception as exc:  # noqa: BLE001 - then it is stopped and the session reopened
                log.warning("%s: the running server does not answer (%s): reopening instead", self.cell_id, exc)
        if session is None:
            log.warning("%s: could not reattach to the cell's running server: stopping it, reopening the session",
                        self.cell_id)
            if server is not None:
                await self.stop_server()
            else:
                self.live = live
                await self.drop_live()
            self._release_port()
            return False
        self.session_id, self.resumed = session.id, "reattached"
        log.info("%s: reattached to its running server (launcher pid %s, port %s), session %s",
                 self.cell_id, record.launcher_pid, record.port, session.id)
        return True

    async def drop_live(self) -> None:
        """The running cell of ``self.live`` is not taken over: stop it, every process of it."""
        live, self.live = self.live, None
        if live is not None:
            live.taken = True
            await kill_live(live, self.engine.settings.stop_grace, self.engine.work_dir)
            self.engine.records.remove(self.cell_id)

    def remember(self) -> None:
        """A cell that may outlive this operator: record what the next one needs to reattach
        to it (infra/cellrecords.py), in the operator's private dir."""
        server = self.server
        if server is None or server.spec.outlive_deadline is None or self.session_id is None or server.pid is None:
            return
        started = server.launcher_start  # read at the spawn, not now (its pid may be another's by now)
        if started is None or start_ticks(server.pid) != started:  # the launcher is gone
            return
        self.engine.records.write(CellRecord(
            cell_id=self.cell_id, launcher_pid=server.pid, launcher_start=started, port=server.spec.port,
            password=server.password, session_id=self.session_id, owner=server.spec.owner.token,
            deadline_at=time.time() + server.spec.outlive_deadline, sweep_token=server.sweep_token,
            policy=policy_fingerprint(self.policy)))

    async def _boot_once(self) -> None:
        assert self.worktree is not None
        if self.port is None:
            self.port = self.engine.ports.allocate(owner=self.cell_id)
        settings = self.engine.settings
        outlive = None
        if settings.cells_outlive_operator and self.box_end is not None:
            outlive = max(1.0, self.box_end - time.monotonic()) + OUTLIVE_SLACK
        self.server = OpenCodeServer(self._server_spec(self.engine.owner, outlive))
        await self.server.start(timeout=settings.health_timeout)
        await self._follow_events()
        if self.reopen_session is not None:
            try:
                reopened = await self.client.get_session(self.reopen_session)
            except Exception as exc:
                raise ServerBootError(f"server on port {self.port} is healthy but could not read session "
                                      f"{self.reopen_session}: {exc}") from exc
            self.resumed = "reopened" if reopened is not None else "restarted"
            if reopened is not None:
                self.session_id = reopened.id
                self.remember()
                return
        try:
            session = await self.client.create_session(title=self.spec.commit_message)
        except Exception as exc:
            raise ServerBootError(f"server on port {self.port} is healthy but could not open a session: {exc}") from exc
        self.session_id = session.id
        self.remember()

    async def restart_server(self) -> None:
        """BOOT_RETRY after the server died mid-task: kill what is left, throw away the dead
        agent's partial edits, and boot a fresh server with a new session. Raises
        ServerBootError when the task's restarts are used up."""
        await self.stop_server()
        if not self.restarts_left:
            raise ServerBootError(f"the OpenCode server of {self.cell_id} was lost and its "
                                  f"{self.engine.settings.recovery.boot_restarts} restarts are used up")
        self.restarts_left -= 1
        await self.start_over()
        self.reopen_session = None  # the dead agent's edits are gone: a fresh session
        await self.start_server()

    async def start_over(self) -> None:
        """Back to the checkout as the task started it (a retry after a lost server or a
        transient error): the start commit, with the files laid in at the start if any (a
        rebase round's earlier result, a lost run's green change). The first message is the
        task's own again, unless that start came with one (a lost run's summary)."""
        if self.worktree is not None:
            await asyncio.to_thread(self.worktree.revert, self.box_end)
            laid = self.spec.start_from or self.spec.resumed_from
            if laid:
                await asyncio.to_thread(self.worktree.lay_files, laid)
        if not self.spec.resumed_from:
            self.next_prompt = None
        self.following = False  # a reattached turn is not followed again: the retry prompts

    async def sweep(self) -> None:
        """End every process of the cell but its server (what the agent left running)."""
        if self.server is not None:
            await self.server.sweep()

    # -- teardown --

    async def stop_server(self) -> None:
        if self._follower is not None:
            await self._follower.stop()
            self._follower = None
        if self.client is not None:
            await self.client.aclose()
            self.client = None
        if self.server is not None:
            await self.server.stop(grace=self.engine.settings.stop_grace)
        self.engine.records.remove(self.cell_id)  # nothing of it runs on to reattach to
        self.session_id = None

    def _release_port(self) -> None:
        if self.port is not None:
            self.engine.ports.release(self.port)
            self.port = None

    async def teardown(self, *, keep_branch: bool) -> None:
        """Kill the server's group, remove the worktree (and the branch unless it holds the
        result), release the port, remove the cell's state. Safe after a partial bootstrap."""
        if self.worktree is not None:  # a git step a cancelled run left running (a hanging filter)
            self.worktree.kill_running()
        try:
            await self.drop_live()  # a running cell handed over that this run never took up
            await self.stop_server()
        finally:
            try:
                if self.worktree is not None:
                    await asyncio.to_thread(self.engine.worktrees.remove, self.worktree, keep_branch=keep_branch)
            finally:
                self._release_port()
                shutil.rmtree(self.state_dir, ignore_errors=True)  # fd-based: follows no link the cell planted
                self.engine.files.cell_log(self.cell_id).unlink(missing_ok=True)

