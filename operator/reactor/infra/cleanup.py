"""`reactor cleanup`: remove what a crashed Reactor process left behind.

Only things Reactor marked are touched: servers carrying its environment markers whose
owning process is gone, and worktrees it recorded whose owner is gone. A concurrent,
live Reactor process keeps its cells.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from reactor.infra.cellrecords import CellRecords
from reactor.infra.private import OperatorFiles
from reactor.infra.processes import find_marked_processes, kill_process_group
from reactor.infra.worktrees import WorktreeManager, safe_component


def cleanup_leftovers(work_dir: Path, repo: Path | None = None, keep: frozenset[str] = frozenset(),
                      running: frozenset[str] = frozenset()) -> list[str]:
    """``keep``: cell ids whose checkout and state dir stay (the operator resumes them in
    their sessions); their orphaned servers are killed all the same, except those of
    ``running`` (cells proven to be the ones recorded, which the operator reattaches to)."""
    work_dir = Path(work_dir).resolve()
    report = []
    live_cells = set()
    for server in find_marked_processes(str(work_dir)):
        if server.owner_alive or server.cell in running:
            live_cells.add(safe_component(server.cell))
            continue
        kill_process_group(server.pid)
        report.append(f"killed orphaned server pid {server.pid} (cell {server.cell})")

    manager = WorktreeManager(work_dir / "worktrees")
    repos = {Path(repo).resolve()} if repo is not None else set(manager.recorded_repositories())
    for repository in sorted(repos):
        if not repository.exists():
            continue
        for worktree in manager.cleanup(repository, keep):
            report.append(f"removed worktree {worktree.path} (branch {worktree.branch}) of {repository}")

    cells_dir = work_dir / "cells"
    for cell_dir in sorted(cells_dir.iterdir()) if cells_dir.is_dir() else []:
        if cell_dir.name not in live_cells and cell_dir.name not in {safe_component(c) for c in keep}:
            # shutil.rmtree is fd-based here: it removes links the cell planted, never their targets.
            shutil.rmtree(cell_dir, ignore_errors=True)
            report.append(f"removed cell state {cell_dir}")
    for cell in CellRecords(OperatorFiles(work_dir).root).remove_stale(running):
        report.append(f"removed the record of cell {cell} (not running, or not to be reattached)")
    for stale in OperatorFiles(work_dir).remove_stale_temp():
        report.append(f"removed the temp dir of a gone Reactor process {stale}")
    logs_dir = OperatorFiles(work_dir).logs
    for log in sorted(logs_dir.glob("*.log")) if logs_dir.is_dir() else []:
        if log.stem not in live_cells:
            log.unlink(missing_ok=True)
    return report
