"""Starting a command in a cell through the launcher (``landlock.py``), the operator's side.

The launcher's own process gets a fixed environment chosen here (the markers that tell
whose it is, nothing else): nothing the task supplies reaches the dynamic loader or Python
before confinement. The command's environment (the task's secrets), the policy and the
deadline travel in a memfd the launcher inherits and reads once; the command line holds
only the command.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from reactor.infra import landlock

LAUNCHER = Path(landlock.__file__).resolve()
EXIT_DEADLINE = landlock.EXIT_DEADLINE
EXIT_REFUSED = landlock.EXIT_REFUSED
# socket() families no cell may open (seccomp): pathname unix sockets are not mediated by
# Landlock (ABI <= 7), and a cell must not reach an ssh-agent, docker or containerd socket.
REFUSED_SOCKET_FAMILIES = (landlock.AF_UNIX,)


@dataclass
class Launch:
    """What to spawn: ``argv`` with exactly ``env`` and ``pass_fds`` (then ``close()``)."""

    argv: list[str]
    env: dict[str, str]
    pass_fds: tuple[int, ...]

    def close(self) -> None:
        """After the spawn: the child holds its own copies of the descriptors."""
        for fd in self.pass_fds:
            try:
                os.close(fd)
            except OSError:
                pass


def prepare(command: Sequence[str], env: dict[str, str], policy: dict | None, *, deadline: float | None = None,
            term_grace: float = 1.0, launcher_env: dict[str, str] | None = None, pass_env: Sequence[str] = (),
            extra_fds: Sequence[int] = (), parent_death: bool = True, sweep_token: str = "") -> Launch:
    """``policy``: ``CellPolicy.launch_policy(...)``, or None to run unconfined (still reaped,
    still with a fixed launcher environment). ``extra_fds``: descriptors the policy names
    (a net ruleset), handed over and closed with the Launch. ``pass_env``: variables the
    launcher copies from its own environment into the command's (set by a git that runs it).
    ``parent_death=False``: the command is not stopped when the caller dies (a cell meant to
    outlive its operator); it needs a ``deadline``, which still ends it. ``sweep_token``: what
    the launcher's "swept" line carries, so that the cell (which writes the same stdout)
    cannot pass a line of its own for it."""
    if not parent_death and deadline is None:
        raise ValueError("a cell that may outlive its operator needs a deadline")
    config = {"env": env, "policy": policy, "deadline": deadline, "term_grace": term_grace, "pass_env": list(pass_env),
              "parent_death": parent_death, "sweep_token": sweep_token}
    fd = os.memfd_create("reactor-launch", os.MFD_CLOEXEC)
    try:
        data = json.dumps(config).encode()
        while data:
            data = data[os.write(fd, data):]
    except BaseException:
        os.close(fd)
        raise
    argv = [sys.executable, "-I", "-S", str(LAUNCHER), "--config-fd", str(fd), "--", *command]
    return Launch(argv, dict(launcher_env or {}), (fd, *extra_fds))


def wait_status_message(code: int, deadline: float | None) -> str | None:
    """What the launcher's exit code says beyond the command's own status, if anything."""
    if code == EXIT_DEADLINE and deadline is not None:
        return f"did not finish within {deadline:g}s; it and everything it started were killed"
    if code == EXIT_REFUSED:
        return "was refused by the cell launcher (it could not be confined)"
    return None
