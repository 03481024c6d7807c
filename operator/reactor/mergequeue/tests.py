"""The locked test command on a candidate, confined as a cell's tests are.

The test command is the repository's own code, so it runs in a Landlock domain built like a
cell's (``Confinement.cell_policy``: write only its throwaway checkout and state dir, read
the system minus the protected paths and the objects of the repository it borrows from,
no TCP to the operator's or the cells' ports, no signals or ptrace outside), through the
same launcher, with the cell markers (``cleanup`` and the leak checks find it), in a
process group of its own that is killed when it ends or times out.

Directly under the launcher rather than through an `opencode serve` shell as TCR does: no
agent takes part in integration, so a server would only add a boot (~1.2 s of CPU, a few
hundred MiB) per run; the confinement is the same either way.

Each run gets a fresh checkout (`clone --shared` of the queue's repository, the candidate
checked out by Reactor before anything of it runs) that is removed afterwards: the test may
write its checkout and its `.git`, and nothing it wrote is ever read or run by Reactor.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from reactor.infra import launcher
from reactor.infra.confinement import Confinement
from reactor.infra.git import git
from reactor.infra.processes import Owner, find_marked_processes, marker_env
from reactor.infra.worktrees import git_common_dir, safe_component

OUTPUT_TAIL_BYTES = 4000
EXIT_TIMED_OUT = 124
# What a test run inherits of Reactor's environment (as the operator's servers do): no secret.
_PASSTHROUGH_ENV = ("PATH", "USER", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR")


@dataclass(frozen=True)
class TestRun:
    commit: str
    exit_code: int
    timed_out: bool
    output_tail: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class ConfinedTests:
    """Runs test commands on commits of repositories, each in a confined throwaway checkout
    under ``work_dir/queue-runs``."""

    def __init__(self, confinement: Confinement, work_dir: Path, owner: Owner | None = None):
        self.confinement = confinement
        self.work_dir = Path(work_dir).resolve()
        self.owner = owner or Owner.current()
        self.runs_dir = self.work_dir / "queue-runs"

    async def run(self, repo: Path, commit: str, command: str, name: str, timeout: float = 600.0) -> TestRun:
        started = time.monotonic()
        slot = safe_component(name)
        checkout, state = self.runs_dir / slot / "checkout", self.runs_dir / slot / "state"
        cell = f"queue-{slot}"
        try:
            await asyncio.to_thread(self._prepare, Path(repo), commit, checkout, state)
            exit_code, timed_out, tail = await self._execute(Path(repo), command, checkout, state, cell, timeout)
        finally:
            await asyncio.to_thread(self._reap, cell)
            await asyncio.to_thread(shutil.rmtree, self.runs_dir / slot, True)
        return TestRun(commit, exit_code, timed_out, tail, round(time.monotonic() - started, 3))

    def _prepare(self, repo: Path, commit: str, checkout: Path, state: Path) -> None:
        shutil.rmtree(checkout.parent, ignore_errors=True)  # a run a crashed driver left
        for name in ("home", "tmp", "cache"):
            (state / name).mkdir(parents=True)
        # Trusted: the repository is Reactor's and the checkout new; nothing of it has run yet.
        git(checkout.parent, "clone", "--quiet", "--shared", "--no-checkout", str(repo), str(checkout))
        git(checkout, "checkout", "--quiet", "--detach", commit)

    async def _execute(self, repo: Path, command: str, checkout: Path, state: Path, cell: str,
                       timeout: float) -> tuple[int, bool, str]:
        env = {k: os.environ[k] for k in _PASSTHROUGH_ENV if k in os.environ}
        env.update(HOME=str(state / "home"), TMPDIR=str(state / "tmp"), XDG_CACHE_HOME=str(state / "cache"),
                   GOCACHE=str(state / "cache" / "go-build"), CI="true")
        markers = marker_env(cell, self.owner, str(self.work_dir))
        env.update(markers)
        policy, fds = None, ()
        if self.confinement.enabled:
            cell_policy = await asyncio.to_thread(
                self.confinement.cell_policy, writable=[checkout, state], readable=[git_common_dir(repo) / "objects"],
                path_env=env.get("PATH", os.defpath))
            # No server of its own: port 0 (ephemeral) is allowed anyway; the operator's ports
            # and the cell range stay refused.
            net = await asyncio.to_thread(cell_policy.net.take, 0) if cell_policy.net is not None else None
            fds = () if net is None else (net,)
            policy = cell_policy.launch_policy(net_ruleset_fd=net)
        # Under the cell launcher: a fixed environment until the confined exec, a subreaper
        # that kills every process of the run when it ends or at the deadline.
        launch = launcher.prepare(["bash", "-c", command], env, policy, deadline=timeout, term_grace=0.0,
                                  launcher_env=markers, extra_fds=fds)
        try:
            process = await asyncio.create_subprocess_exec(
                *launch.argv, cwd=checkout, env=launch.env, pass_fds=launch.pass_fds, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        finally:
            launch.close()
        tail = bytearray()

        async def pump() -> None:
            assert process.stdout is not None
            while chunk := await process.stdout.read(65536):
                tail.extend(chunk)
                del tail[:-OUTPUT_TAIL_BYTES]

        reader = asyncio.create_task(pump())
        timed_out = False
        try:
            # The launcher ends the run at the deadline; a little more for it to say so.
            await asyncio.wait_for(process.wait(), timeout + 5.0)
            timed_out = process.returncode == launcher.EXIT_DEADLINE
        except asyncio.TimeoutError:
            timed_out = True
        finally:
            # The run's group goes with it (background jobs it left, or all of it on a timeout),
            # and whatever left the group but carries the run's marker.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if process.returncode is None:
                await process.wait()
            await asyncio.to_thread(self._reap, cell)
            try:
                await asyncio.wait_for(reader, 5.0)
            except asyncio.TimeoutError:
                pass  # a writer that escaped both: its output is not waited for
        exit_code = EXIT_TIMED_OUT if timed_out else process.returncode
        return exit_code, timed_out, tail.decode(errors="replace")

    def _reap(self, cell: str) -> None:
        """Processes of the run that left its group (setsid) still carry its marker."""
        for found in find_marked_processes(str(self.work_dir), cell=cell):
            try:
                os.killpg(found.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
