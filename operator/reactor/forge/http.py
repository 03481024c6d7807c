"""The HTTP part the adapters share: one httpx client per forge, the token in a header only,
answers mapped onto ForgeUnavailable / ForgeRefused."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from reactor.forge.types import ForgeRefused, ForgeUnavailable, HeadOutOfDate, NotMergeable

TIMEOUT = httpx.Timeout(20.0, connect=5.0)
# The forge is a host the tenant names: its answer is read up to this many bytes (decoded),
# within this many seconds in all (httpx's read timeout is per chunk), never to its end.
MAX_ANSWER = 1 << 20
ANSWER_DEADLINE = 60.0


class ForgeHTTP:
    def __init__(self, api_url: str, headers: dict[str, str], client: httpx.AsyncClient | None = None):
        self.api_url = api_url.rstrip("/")
        # The token lives in these headers and nowhere else (never in a URL, argv or a message).
        self._client = client or httpx.AsyncClient(timeout=TIMEOUT, headers=headers, follow_redirects=False)
        if client is not None:
            self._client.headers.update(headers)
        self.calls = 0

    async def merge(self, method: str, path: str, payload: dict) -> None:
        """A merge guarded by head commit: both forges answer 409 when the head moved and 405
        when the PR cannot be merged (yet)."""
        try:
            await self.request(method, path, json=payload, ok=(200,))
        except ForgeRefused as exc:
            if exc.status == 409:
                raise HeadOutOfDate(str(exc), 409) from None
            if exc.status == 405:
                raise NotMergeable(str(exc), 405) from None
            raise

    async def request(self, method: str, path: str, *, json: Any = None, params: dict | None = None,
                      ok: tuple[int, ...] = (200, 201)) -> httpx.Response:
        """One API call. Returns the response when its status is in ``ok`` (or 404, for the
        caller to read as "none"); raises otherwise."""
        self.calls += 1
        try:
            response = await asyncio.wait_for(self._bounded(method, f"{self.api_url}{path}", json, params),
                                              ANSWER_DEADLINE)
        except (httpx.HTTPError, asyncio.TimeoutError) as exc:  # connection refused, timeout, reset
            raise ForgeUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        if response.status_code in ok or response.status_code == 404 and method == "GET":
            return response
        message = f"{method} {path}: {response.status_code} {error_message(response)}"
        if response.status_code >= 500 or response.status_code == 429:
            raise ForgeUnavailable(message)
        raise ForgeRefused(message, response.status_code)

    async def _bounded(self, method: str, url: str, json: Any, params: dict | None) -> httpx.Response:
        """The answer, its body read up to MAX_ANSWER bytes (ForgeRefused past that)."""
        async with self._client.stream(method, url, json=json, params=params) as streamed:
            body = bytearray()
            async for chunk in streamed.aiter_bytes():
                body += chunk
                if len(body) > MAX_ANSWER:
                    raise ForgeRefused(f"{method} {url}: the forge's answer is larger than {MAX_ANSWER} bytes",
                                       streamed.status_code)
        # Decoded already: a new response without the encoding headers, holding the body.
        headers = [(k, v) for k, v in streamed.headers.items()
                   if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
        return httpx.Response(streamed.status_code, headers=headers, content=bytes(body), request=streamed.request)

    async def aclose(self) -> None:
        await self._client.aclose()


def error_message(response: httpx.Response) -> str:
    """The forge's own explanation, short (Gitea and GitHub both answer {"message": ...})."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(data, dict):
        parts = [str(data.get("message") or "")]
        for error in data.get("errors") or []:  # GitHub's validation details
            if isinstance(error, dict) and error.get("message"):
                parts.append(str(error["message"]))
            elif isinstance(error, str):
                parts.append(error)
        return "; ".join(p for p in parts if p)[:500]
    return str(data)[:300]
