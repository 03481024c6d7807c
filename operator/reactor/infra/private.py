"""What the operator keeps for itself, where no cell can read or write it.

Under the work dir, beside (never inside) the cells' checkouts and state dirs, one 0700
directory ``<work-dir>/operator/``:

- ``tmp/<owner>/``: the process's temp dir (``TMPDIR``, ``tempfile.tempdir``), set before
  anything creates a temp file. The kubernetes client writes a kubeconfig's embedded
  client key there for the process's whole life; git credentials (askpass script, ssh key)
  sit there during a fetch or push. One per process (two may share a work dir); those of
  processes that are gone (a SIGKILL leaves the keys behind) are removed at the next start.
- ``home/``: HOME and XDG_CONFIG_HOME of every git the operator runs (empty: no user or
  planted config is read).
- ``logs/<cell>.log``: each cell server's output, read by the operator through a pipe (a
  cell that may outlive the operator writes it directly, through the descriptor it inherits).
- ``cells/<cell>.json``: the record of each cell that may outlive the operator, for the next
  one to reattach to (``reactor.infra.cellrecords``).

Cells are granted their own checkout and state dir only, never the work dir, so none of
this is readable by a cell; nothing here is ever reached through a cell-writable path.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from reactor.infra.processes import Owner
from reactor.infra.safefs import private_dir

log = logging.getLogger(__name__)

DIR_NAME = "operator"


class OperatorFiles:
    def __init__(self, work_dir: Path):
        self.root = Path(work_dir) / DIR_NAME

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def temp_root(self) -> Path:
        return self.root / "tmp"

    def prepare(self) -> OperatorFiles:
        for path in (self.root, self.home, self.logs, self.temp_root):
            private_dir(path)
        return self

    def cell_log(self, cell_id: str) -> Path:
        from reactor.infra.worktrees import safe_component  # worktrees -> git -> private

        return self.logs / f"{safe_component(cell_id)}.log"

    def remove_stale_temp(self) -> list[Path]:
        """Temp dirs of Reactor processes that are gone (their names are Owner tokens)."""
        removed = []
        for entry in sorted(self.temp_root.iterdir()) if self.temp_root.is_dir() else []:
            if not Owner.is_alive_token(entry.name.replace("_", ":", 1)):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        return removed


_claimed: OperatorFiles | None = None
_claim_lock = threading.Lock()


def claim_process_dirs(work_dir: Path) -> OperatorFiles:
    """Make this process's temp dir and git HOME the private ones under ``work_dir``. Called
    first thing by `reactor operator` and `reactor run` (before the kubernetes client loads a
    kubeconfig); later calls return the first claim."""
    global _claimed
    with _claim_lock:
        if _claimed is not None:
            return _claimed
        files = OperatorFiles(work_dir).prepare()
        for stale in files.remove_stale_temp():
            log.info("removed the temp dir of a Reactor process that is gone: %s", stale)
        temp = private_dir(files.temp_root / Owner.current().token.replace(":", "_"))
        os.environ["TMPDIR"] = str(temp)
        tempfile.tempdir = str(temp)
        atexit.register(shutil.rmtree, temp, True)  # registered first, so it runs after the kubernetes client's
        _claimed = files
        return files


def temp_dir() -> Path | None:
    """This process's private temp dir once claimed (else None: the default temp dir)."""
    return Path(tempfile.tempdir) if _claimed is not None and tempfile.tempdir else None


_fallback_home: Path | None = None


def git_home() -> Path:
    """HOME for the operator's git runs: the claimed private one, else (a library use, the
    unit tests) an empty 0700 dir of this process's."""
    global _fallback_home
    if _claimed is not None:
        return _claimed.home
    with _claim_lock:
        if _fallback_home is None:
            _fallback_home = Path(tempfile.mkdtemp(prefix="reactor-git-home-"))
            atexit.register(shutil.rmtree, _fallback_home, True)
        return _fallback_home
