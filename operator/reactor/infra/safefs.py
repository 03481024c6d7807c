"""File operations inside trees a cell can write, without following anything it planted.

A cell may replace any entry of its checkout or state dir with a symbolic link (to the
operator's ~/.gitconfig, say) or a hard link, at any time. Whatever the operator does
there goes through directory file descriptors opened with ``O_NOFOLLOW`` from the tree's
root (which the cell cannot replace: it may write beneath it, not the root itself), never
writes into an existing file (it unlinks and creates with ``O_EXCL``), and reads only
regular files. Everything else the operator keeps lives outside cell-writable trees
(``reactor.infra.private``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class PlantedPath(OSError):
    """An entry the operator must use is not what it should be (a link, a device...)."""


def _parts(relative: str | os.PathLike) -> list[str]:
    parts = [p for p in PurePosixPath(os.fspath(relative)).parts if p not in ("", ".")]
    if any(p == ".." or p.startswith("/") for p in parts):
        raise ValueError(f"{relative!r} is not a plain relative path")
    return parts


@contextlib.contextmanager
def opened_dir(root: Path, relative: str | os.PathLike = "", *, create: bool = False) -> Iterator[int]:
    """A file descriptor of ``root/relative``, walked one component at a time without
    following links. ``create``: make missing directories, and replace an entry that is
    not a directory (a planted link or file) with one."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for name in _parts(relative):
            if create:
                _ensure_dir(fd, name)
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise PlantedPath(exc.errno, f"{root}/{relative}: {name} is not a directory") from None
                raise
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _ensure_dir(dir_fd: int, name: str, mode: int = 0o755) -> None:
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
        return
    except FileExistsError:
        pass
    if not stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
        _remove(dir_fd, name)
        os.mkdir(name, mode, dir_fd=dir_fd)


def _remove(dir_fd: int, name: str) -> None:
    """Remove an entry whatever it is; a directory with everything beneath it (shutil's
    fd-based rmtree, which does not follow links)."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def replace_file(root: Path, relative: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` as a new file at ``root/relative`` (directories created), whatever was
    there before: the old entry is unlinked, never written through."""
    *dirs, name = _parts(relative)
    with opened_dir(root, os.path.join(*dirs) if dirs else "", create=True) as dir_fd:
        _remove(dir_fd, name)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
        with os.fdopen(fd, "wb") as out:
            out.write(data)


def replace_symlink(root: Path, relative: str | os.PathLike, target: str | os.PathLike) -> None:
    """Make ``root/relative`` a link to ``target`` (an operator-chosen, trusted target)."""
    *dirs, name = _parts(relative)
    with opened_dir(root, os.path.join(*dirs) if dirs else "", create=True) as dir_fd:
        _remove(dir_fd, name)
        os.symlink(os.fspath(target), name, dir_fd=dir_fd)


def make_dirs(root: Path, *relatives: str | os.PathLike) -> None:
    """Make sure each ``root/relative`` is a real directory (a planted link is replaced)."""
    for relative in relatives:
        with opened_dir(root, relative, create=True):
            pass


def read_regular(root: Path, relative: str | os.PathLike, limit: int | None = None) -> bytes | None:
    """The bytes of ``root/relative`` if it is a regular file reached without following a
    link; None otherwise (missing, a link, a directory, a fifo...)."""
    *dirs, name = _parts(relative)
    try:
        with opened_dir(root, os.path.join(*dirs) if dirs else "") as dir_fd:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except (PlantedPath, FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise
    with os.fdopen(fd, "rb") as source:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return source.read() if limit is None else source.read(limit)


def private_dir(path: Path, mode: int = 0o700) -> Path:
    """Create ``path`` (and its parents) as a directory only this user can enter, refusing
    one that is a link or belongs to someone else."""
    path = Path(path)
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise PlantedPath(errno.EPERM, f"{path} is not a directory of this user's")
    if stat.S_IMODE(info.st_mode) != mode:
        os.chmod(path, mode)  # checked above to be our own directory, not a link
    return path
