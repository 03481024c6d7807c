"""Gitea and Forgejo (the same REST API, /api/v1): tested against a real Gitea 1.26.

Measured behaviour this adapter relies on (docs/forge.md): a second PR for the same head and
base answers 409 "pull request already exists"; there is no draft field (a "WIP:" title
prefix makes a draft); a merge with ``head_commit_id`` not equal to the PR's head answers
409; a merge refused by required checks answers 405.
"""

from __future__ import annotations

from urllib.parse import quote

import httpx

from reactor.forge.http import ForgeHTTP, error_message
from reactor.forge.types import (
    STATUS_CONTEXT,
    AlreadyExists,
    ForgeKind,
    ForgeRefused,
    PRState,
    PullRequest,
)

DRAFT_PREFIX = "WIP: "


class GiteaForge:
    kind = ForgeKind.GITEA

    def __init__(self, api_url: str, owner: str, repo: str, token: str, client: httpx.AsyncClient | None = None):
        """``api_url``: e.g. https://gitea.example.com/api/v1."""
        self.http = ForgeHTTP(api_url, {"Authorization": f"token {token}", "Accept": "application/json"}, client)
        self.repo_path = f"/repos/{quote(owner, safe='')}/{quote(repo, safe='')}"

    @property
    def calls(self) -> int:
        return self.http.calls

    async def find_pull_request(self, head: str, base: str) -> PullRequest | None:
        response = await self.http.request("GET", f"{self.repo_path}/pulls/{quote(base, safe='')}/{quote(head, safe='/')}")
        return None if response.status_code == 404 else _pull_request(response.json())

    async def create_pull_request(self, head: str, base: str, title: str, body: str, draft: bool) -> PullRequest:
        payload = {"head": head, "base": base, "title": (DRAFT_PREFIX + title) if draft else title, "body": body}
        try:
            response = await self.http.request("POST", f"{self.repo_path}/pulls", json=payload, ok=(201,))
        except ForgeRefused as exc:
            if exc.status == 409:
                raise AlreadyExists(str(exc), 409) from None
            raise
        return _pull_request(response.json())

    async def update_pull_request(self, number: int, title: str | None = None, body: str | None = None,
                                  base: str | None = None) -> PullRequest:
        payload = {key: value for key, value in (("title", title), ("body", body), ("base", base)) if value is not None}
        response = await self.http.request("PATCH", f"{self.repo_path}/pulls/{number}", json=payload, ok=(201, 200))
        return _pull_request(response.json())

    async def get_pull_request(self, number: int) -> PullRequest:
        response = await self.http.request("GET", f"{self.repo_path}/pulls/{number}")
        if response.status_code == 404:
            raise ForgeRefused(f"pull request #{number} not found", 404)
        return _pull_request(response.json())

    async def set_commit_status(self, commit: str, state: str, description: str, target_url: str | None = None,
                                context: str = STATUS_CONTEXT) -> None:
        payload = {"state": state, "description": description[:140], "context": context, "target_url": target_url or ""}
        await self.http.request("POST", f"{self.repo_path}/statuses/{commit}", json=payload, ok=(201, 200))

    async def merge_pull_request(self, number: int, head_commit: str, method: str = "merge") -> None:
        await self.http.merge("POST", f"{self.repo_path}/pulls/{number}/merge", {"Do": method, "head_commit_id": head_commit})

    async def aclose(self) -> None:
        await self.http.aclose()


def _pull_request(data: dict) -> PullRequest:
    if data.get("merged"):
        state = PRState.MERGED
    else:
        state = PRState.OPEN if data.get("state") == "open" else PRState.CLOSED
    title = data.get("title") or ""
    return PullRequest(
        number=int(data["number"]), url=data.get("html_url") or "", head_branch=(data.get("head") or {}).get("ref", ""),
        head_commit=(data.get("head") or {}).get("sha", ""), base_branch=(data.get("base") or {}).get("ref", ""),
        state=state, title=title, body=data.get("body") or "",
        draft=bool(data.get("draft")) or title.startswith(DRAFT_PREFIX),
    )


__all__ = ["GiteaForge", "error_message"]
