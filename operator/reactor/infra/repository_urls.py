"""Which repository URLs the operator fetches. A tenant names the URL; the operator's git
follows it with the operator's rights, so the URL is checked before any git command sees it.

- Credentials never ride in a URL: a URL reaches git's (and ssh's) command line, which every
  process of the same user reads in /proc/*/cmdline. https:// and file:// carry no user
  info at all; ssh:// may name a plain user (git@). Credentials go in the task's
  credentialsSecretRef. (The CRD refuses such URLs at admission; this catches objects
  stored before that rule.)
- file:// is refused unless the administrator allows path prefixes
  (``reactor operator --allow-file-urls PREFIX``), and never leads into the operator's
  work dir (other tasks' mirrors and cells), whatever the prefixes say. The path is judged
  after symlinks and ``..`` are resolved, and so is every place git would read the
  repository from (a ``.git`` file naming another git dir, ``commondir``, object
  alternates, symlinks inside the git dir); git is then given the resolved path, not the
  tenant's text. Hard links and a link swapped between this check and the clone are not
  caught: allow only directories tenants cannot write.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from reactor.errors import ReactorError

SCHEMES = ("https", "ssh", "file")
LOCAL_HOSTS = ("127.0.0.1", "localhost")
FILE_URL_FLAG = "--allow-file-urls"
_SSH_USER = re.compile(r"[A-Za-z0-9._-]+")


class RepositoryRefused(ReactorError):
    """A repository URL the operator will not fetch."""


def redact_url(url: str) -> str:
    """A URL fit for logs and messages: any user:password@ part removed."""
    return re.sub(r"://[^/?#]*@", "://", url)


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


@dataclass(frozen=True)
class RepositoryPolicy:
    """``work_dir``: the operator's own files, never a repository; ``file_prefixes``: where
    file:// repositories may live (none: file:// is refused)."""

    work_dir: Path
    file_prefixes: tuple[Path, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "work_dir", Path(os.path.realpath(self.work_dir)))
        object.__setattr__(self, "file_prefixes", tuple(Path(os.path.realpath(p)) for p in self.file_prefixes))

    def clone_url(self, url: str) -> str:
        """The URL git is given for ``url``; raises RepositoryRefused."""
        split = urlsplit(url)
        scheme = split.scheme
        local_http = scheme == "http" and split.hostname in LOCAL_HOSTS  # a forge on this machine (dev-forge)
        if (scheme not in SCHEMES and not local_http) or not url.startswith(f"{scheme}://"):
            raise RepositoryRefused(f"spec.repository.url {redact_url(url)!r}: only https://, ssh:// and file:// "
                                    "URLs are fetched (http:// only to 127.0.0.1 or localhost)")
        if "@" in split.netloc:
            user = split.netloc.rpartition("@")[0]
            if scheme != "ssh" or not _SSH_USER.fullmatch(user):
                raise RepositoryRefused(
                    f"spec.repository.url {redact_url(url)!r} carries credentials in the URL, which would reach "
                    "process arguments; put them in a Secret named by spec.repository.credentialsSecretRef "
                    "(an ssh:// URL may name a plain user, as in ssh://git@host/repo.git)")
        if scheme != "file":
            return url
        return self._file_url(url, split)

    def _file_url(self, url: str, split) -> str:
        if not self.file_prefixes:
            raise RepositoryRefused(
                f"file:// repositories are not allowed by this operator ({url}); an administrator allows path "
                f"prefixes with `reactor operator {FILE_URL_FLAG} PREFIX`")
        if split.netloc not in ("", "localhost") or split.query or split.fragment or "?" in url or "#" in url:
            raise RepositoryRefused(f"{url}: a file:// URL is a local absolute path (file:///path), nothing else")
        path = Path(os.path.realpath(unquote(split.path)))
        for place in _places(path):
            if _within(place, self.work_dir):
                raise RepositoryRefused(f"{url} leads into the operator's work dir (other tasks' mirrors and cells); "
                                        f"refused whatever {FILE_URL_FLAG} allows")
            if not any(_within(place, prefix) for prefix in self.file_prefixes):
                allowed = ", ".join(str(p) for p in self.file_prefixes)
                what = "" if place == path else f" (its repository points at {place})"
                raise RepositoryRefused(f"{url}{what} is outside the paths this operator allows for file:// "
                                        f"repositories ({FILE_URL_FLAG}: {allowed})")
        return "file://" + quote(str(path))


# Where git looks for a repository named by a path, in its order (clone's get_repo_path,
# upload-pack's enter_repo): file:///srv/app may open /srv/app.git.
_REPOSITORY_SUFFIXES = ("/.git", "", ".git/.git", ".git")


def _places(path: Path) -> Iterable[Path]:
    """Every place git may read when given ``path`` (resolved): the path itself, and each
    repository git would find there."""
    yield path
    for suffix in _REPOSITORY_SUFFIXES:
        candidate = Path(os.path.realpath(f"{path}{suffix}"))
        if candidate.exists():
            yield candidate
            yield from _indirections(candidate)


def _indirections(path: Path) -> Iterable[Path]:
    """Other places git reads when it opens the repository at ``path`` (resolved): its git
    dir (``.git``, or the dir a ``.git`` file names), a worktree's ``commondir``, object
    alternates, and wherever a symlink inside those git dirs leads (``objects``, a pack or a
    ref linked to another repository's)."""
    dot_git = path / ".git"
    if dot_git.exists():
        git_dirs = [_gitfile_target(dot_git) or Path(os.path.realpath(dot_git))]
    else:  # a bare repository, a `.git` file given directly, or a bundle
        git_dirs = [_gitfile_target(path) or path]
    for git_dir in list(git_dirs):
        common = _read_first_line(git_dir / "commondir")
        if common:
            git_dirs.append(Path(os.path.realpath(git_dir / common)))
    for git_dir in list(git_dirs):
        git_dirs.extend(_alternates(git_dir / "objects", depth=5))
    for git_dir in git_dirs:
        yield git_dir
        yield from _links_inside(git_dir)


MAX_ENTRIES_CHECKED = 200_000


def _links_inside(git_dir: Path) -> Iterable[Path]:
    """Where the symlinks under ``git_dir`` lead (not followed while walking)."""
    if not git_dir.is_dir():
        return
    seen = 0
    for root, dirs, files in os.walk(git_dir, followlinks=False):
        for name in dirs + files:
            seen += 1
            entry = Path(root) / name
            if entry.is_symlink():
                yield Path(os.path.realpath(entry))
        if seen > MAX_ENTRIES_CHECKED:
            raise RepositoryRefused(f"{git_dir} holds over {MAX_ENTRIES_CHECKED} files; too many to check "
                                    "(pack the repository: git gc)")


def _gitfile_target(candidate: Path) -> Path | None:
    line = _read_first_line(candidate) if candidate.is_file() else None
    if line and line.startswith("gitdir:"):
        return Path(os.path.realpath(candidate.parent / line.removeprefix("gitdir:").strip()))
    return None


def _alternates(objects: Path, depth: int) -> Iterable[Path]:
    for line in _read_lines(objects / "info" / "alternates"):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        target = Path(os.path.realpath(objects / line.strip('"')))
        yield target
        if depth > 0:
            yield from _alternates(target, depth - 1)


def _read_first_line(path: Path) -> str | None:
    lines = _read_lines(path)
    return lines[0].strip() if lines else None


def _read_lines(path: Path) -> list[str]:
    """A small regular file's lines (never a FIFO or device someone planted: those block)."""
    try:
        if not path.is_file():
            return []
        with open(path, errors="replace") as handle:
            return handle.read(1 << 16).splitlines()
    except OSError:
        return []
