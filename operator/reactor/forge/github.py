"""GitHub's REST API (api.github.com, or GitHub Enterprise's /api/v3), API version 2022-11-28.

Written against GitHub's documented shapes and unit-tested on recorded answers
(tests/unit/test_forge_github.py); no GitHub is reachable from the test machine.
- find:   GET /repos/{o}/{r}/pulls?head={o}:{branch}&base={base}&state=all (a list)
- create: POST /repos/{o}/{r}/pulls {title, head, base, body, draft} -> 201; a duplicate answers
          422 "Validation Failed" with an error "A pull request already exists for {o}:{branch}."
- update: PATCH /repos/{o}/{r}/pulls/{n} {title, body, base} -> 200 (base: retarget, as for stacked PRs)
- status: POST /repos/{o}/{r}/statuses/{sha} {state, target_url, description, context} -> 201
- merge:  PUT /repos/{o}/{r}/pulls/{n}/merge {sha, merge_method} -> 200; 409 when the head is not
          ``sha``; 405 when it is not mergeable (checks, conflicts)
"""

from __future__ import annotations

from urllib.parse import quote

import httpx

from reactor.forge.http import ForgeHTTP
from reactor.forge.types import (
    STATUS_CONTEXT,
    AlreadyExists,
    ForgeKind,
    ForgeRefused,
    PRState,
    PullRequest,
)

API_VERSION = "2022-11-28"
ALREADY_EXISTS = "a pull request already exists"


class GitHubForge:
    kind = ForgeKind.GITHUB

    def __init__(self, api_url: str, owner: str, repo: str, token: str, client: httpx.AsyncClient | None = None):
        """``api_url``: https://api.github.com, or https://HOST/api/v3 for GitHub Enterprise."""
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json",
                   "X-GitHub-Api-Version": API_VERSION}
        self.http = ForgeHTTP(api_url, headers, client)
        self.owner = owner
        self.repo_path = f"/repos/{quote(owner, safe='')}/{quote(repo, safe='')}"

    @property
    def calls(self) -> int:
        return self.http.calls

    async def find_pull_request(self, head: str, base: str) -> PullRequest | None:
        params = {"head": f"{self.owner}:{head}", "base": base, "state": "all", "per_page": "1"}
        response = await self.http.request("GET", f"{self.repo_path}/pulls", params=params)
        if response.status_code == 404:
            raise ForgeRefused(f"repository {self.repo_path[7:]} not found (or the token may not read it)", 404)
        found = response.json()
        return _pull_request(found[0]) if found else None

    async def create_pull_request(self, head: str, base: str, title: str, body: str, draft: bool) -> PullRequest:
        payload = {"title": title, "head": head, "base": base, "body": body, "draft": draft}
        try:
            response = await self.http.request("POST", f"{self.repo_path}/pulls", json=payload, ok=(201,))
        except ForgeRefused as exc:
            if exc.status == 422 and ALREADY_EXISTS in str(exc).lower():
                raise AlreadyExists(str(exc), 422) from None
            raise
        return _pull_request(response.json())

    async def update_pull_request(self, number: int, title: str | None = None, body: str | None = None,
                                  base: str | None = None) -> PullRequest:
        payload = {key: value for key, value in (("title", title), ("body", body), ("base", base)) if value is not None}
        response = await self.http.request("PATCH", f"{self.repo_path}/pulls/{number}", json=payload, ok=(200,))
        return _pull_request(response.json())

    async def get_pull_request(self, number: int) -> PullRequest:
        response = await self.http.request("GET", f"{self.repo_path}/pulls/{number}")
        if response.status_code == 404:
            raise ForgeRefused(f"pull request #{number} not found", 404)
        return _pull_request(response.json())

    async def set_commit_status(self, commit: str, state: str, description: str, target_url: str | None = None,
                                context: str = STATUS_CONTEXT) -> None:
        payload = {"state": state, "description": description[:140], "context": context}
        if target_url:
            payload["target_url"] = target_url
        await self.http.request("POST", f"{self.repo_path}/statuses/{commit}", json=payload, ok=(201,))

    async def merge_pull_request(self, number: int, head_commit: str, method: str = "merge") -> None:
        await self.http.merge("PUT", f"{self.repo_path}/pulls/{number}/merge", {"sha": head_commit, "merge_method": method})

    async def aclose(self) -> None:
        await self.http.aclose()


def _pull_request(data: dict) -> PullRequest:
    if data.get("merged") or data.get("merged_at"):
        state = PRState.MERGED
    else:
        state = PRState.OPEN if data.get("state") == "open" else PRState.CLOSED
    return PullRequest(
        number=int(data["number"]), url=data.get("html_url") or "", head_branch=(data.get("head") or {}).get("ref", ""),
        head_commit=(data.get("head") or {}).get("sha", ""), base_branch=(data.get("base") or {}).get("ref", ""),
        state=state, title=data.get("title") or "", body=data.get("body") or "", draft=bool(data.get("draft")),
    )
