"""Hostile files for the trust-boundary tests: a global git config whose every way of
running a program leaves a mark, and a cell that plants links in its own state dir."""

from __future__ import annotations

import json
import shlex
from pathlib import Path


def hostile_git_config(home: Path, marker: Path) -> Path:
    """A home dir whose ~/.gitconfig (and XDG git config) would run ``touch marker`` from a
    filter on every file, a merge driver, a hook, fsmonitor, a pager and an alias, if git
    read it."""
    touch = f"touch {shlex.quote(str(marker))}"
    hooks = home / "hooks"
    hooks.mkdir(parents=True, exist_ok=True)
    for hook in ("post-checkout", "pre-commit", "post-commit", "reference-transaction", "pre-push"):
        (hooks / hook).write_text(f"#!/bin/sh\n{touch}\n")
        (hooks / hook).chmod(0o755)
    (home / "attributes").write_text("* filter=owned diff=owned merge=owned\n")
    config = f"""[core]
\tattributesFile = {home / "attributes"}
\thooksPath = {hooks}
\tfsmonitor = {touch}; false
\tpager = {touch}; cat
[filter "owned"]
\tclean = {touch}; cat
\tsmudge = {touch}; cat
\tprocess = {touch}
\trequired = false
[diff "owned"]
\ttextconv = {touch}; cat
[merge "owned"]
\tdriver = {touch}; true
[alias]
\tstatus = !{touch}
"""
    (home / ".gitconfig").write_text(config)
    (home / ".config" / "git").mkdir(parents=True, exist_ok=True)
    (home / ".config" / "git" / "config").write_text(config)
    (home / ".config" / "git" / "attributes").write_text("* filter=owned\n")
    return home


_PLANT = r'''
import json, os, signal
links, elsewhere = json.loads(%(links)r), json.loads(%(elsewhere)r)
state = os.path.dirname(os.environ["HOME"])  # the cell's state dir: HOME is its home/
marker = os.path.join(state, "state", "planted-once")
if os.path.exists(marker):  # after the restart: what was planted, and what is there now
    print(open(marker).read(), end="")
    for relative in sorted(links):
        print("NOW %%s is %%s" %% (relative, "a link" if os.path.islink(os.path.join(state, relative)) else "no link"))
else:
    report = []
    for relative, target in sorted(links.items()):
        path = os.path.join(state, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.lexists(path):
            os.unlink(path)
        os.symlink(target, path)
        report.append("PLANTED %%s -> %%s" %% (relative, target))
    for path, target in sorted(elsewhere.items()):
        try:
            os.symlink(target, path)
            report.append("PLANT-ELSEWHERE %%s: SUCCEEDED" %% path)
        except OSError as exc:
            report.append("PLANT-ELSEWHERE %%s: blocked (%%s)" %% (path, type(exc).__name__))
    with open(marker, "w") as f:
        f.write("\n".join(report) + "\n")
    pid = os.getpid()
    def cmdline(p):
        try:
            return open("/proc/%%d/cmdline" %% p, "rb").read().split(b"\0")
        except OSError:
            return []
    def parent(p):
        with open("/proc/%%d/status" %% p) as f:
            return int(next(l for l in f if l.startswith("PPid:")).split()[1])
    while pid > 1 and b"serve" not in cmdline(pid)[1:3]:
        pid = parent(pid)
    print("KILLING own server %%d" %% pid, flush=True)
    os.kill(pid, signal.SIGKILL)
'''


def plant_links_step(links: dict[str, str], elsewhere: dict[str, str] | None = None):
    """The agent's bash tool, once per task (a marker in its state dir): replace the files
    at ``links`` (paths relative to the cell's state dir) with links to the targets, try
    ``elsewhere`` (absolute link paths outside the cell), then SIGKILL its own server so
    that Reactor restarts it. Run again after the restart (the scenario starts over in the
    new session), it prints what it planted (``PLANTED rel -> target``, ``PLANT-ELSEWHERE
    path: blocked (...)``) and whether each is still a link (``NOW rel is no link``): the
    model sees it in the next request. Paths hidden in hex from OpenCode's command-text
    checks."""
    from reactor_dev.testing.scripted_model import bash

    code = (_PLANT % {"links": json.dumps(links), "elsewhere": json.dumps(elsewhere or {})}).encode().hex()
    return bash(f'python3 -c "exec(bytes.fromhex(\'{code}\'))"')
