"""Which forge serves a repository URL, and its API: from ``forge`` when given, else the host."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from reactor.errors import ConfigurationError
from reactor.forge.gitea import GiteaForge
from reactor.forge.github import GitHubForge
from reactor.forge.types import Forge, ForgeKind

GITEA_HOSTS = ("codeberg.org", "gitea.com")  # known Gitea/Forgejo services; also any host naming gitea/forgejo


@dataclass(frozen=True)
class ForgeRepository:
    kind: ForgeKind
    api_url: str
    owner: str
    name: str

    @property
    def slug(self) -> str:
        return f"{self.owner}/{self.name}"


def _scp_like(url: str) -> str:
    """git@host:owner/repo.git -> ssh://git@host/owner/repo.git"""
    match = re.fullmatch(r"([^@/]+@)?([^:/]+):(?!//)(.+)", url)
    return f"ssh://{match.group(1) or ''}{match.group(2)}/{match.group(3)}" if match else url


def detect_kind(host: str) -> ForgeKind | None:
    host = host.lower()
    if host == "github.com" or host.endswith(".github.com"):
        return ForgeKind.GITHUB
    if host in GITEA_HOSTS or "gitea" in host or "forgejo" in host:
        return ForgeKind.GITEA
    return None


def forge_repository(url: str, kind: str | ForgeKind | None = None) -> ForgeRepository:
    """The forge and repository behind a git URL. ConfigurationError naming what to set when
    it cannot be told."""
    parts = urlsplit(_scp_like(url))
    if parts.scheme not in ("https", "http", "ssh") or not parts.hostname:
        raise ConfigurationError(f"{redact(url)} is not on a forge (a pull request needs an https:// or ssh:// "
                                 "repository URL of GitHub, Gitea or Forgejo)")
    path = parts.path.strip("/").removesuffix(".git")
    segments = path.split("/")
    if len(segments) < 2:
        raise ConfigurationError(f"cannot read owner/repository from {redact(url)}")
    chosen = ForgeKind(kind) if kind else detect_kind(parts.hostname)
    if chosen is None:
        raise ConfigurationError(f"cannot tell which forge serves {parts.hostname}: set spec.result.forge "
                                 "(gitea or github)")
    owner, name = segments[-2], segments[-1]
    prefix = "/".join(segments[:-2])  # a forge served under a sub-path
    scheme = parts.scheme if parts.scheme in ("http", "https") else "https"
    netloc = parts.hostname + (f":{parts.port}" if parts.port and scheme == parts.scheme else "")
    base = f"{scheme}://{netloc}" + (f"/{prefix}" if prefix else "")
    if chosen is ForgeKind.GITHUB:
        api = "https://api.github.com" if parts.hostname.lower() == "github.com" else f"{base}/api/v3"
    else:
        api = f"{base}/api/v1"
    return ForgeRepository(chosen, api, owner, name)


def open_forge(repository: ForgeRepository, token: str, client: httpx.AsyncClient | None = None) -> Forge:
    cls = GitHubForge if repository.kind is ForgeKind.GITHUB else GiteaForge
    return cls(repository.api_url, repository.owner, repository.name, token, client)


def redact(url: str) -> str:
    return re.sub(r"://[^/@]*@", "://", url)
