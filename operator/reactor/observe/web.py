"""The read-only HTTP side: the fleet page, its JSON API, transcripts, ``/metrics``.

    GET /                                       the page (plain HTML + a little script)
    GET /api/v1/tasks                           every task, spend per namespace today, and the merge
                                                queues this process drives (their items in order)
    GET /api/v1/tasks/{ns}/{name}               one task, with its phase timeline
    GET /api/v1/tasks/{ns}/{name}/transcript    ?follow=1 streams a running task's records
                                                ?format=text renders them as `reactor logs` does
    GET /metrics                                Prometheus text format

Nothing here writes anything, and nothing served holds a secret: views and transcripts
are redacted when they are recorded.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from reactor.observe.fleet import utc_iso
from reactor.observe.observation import Observatory
from reactor.observe.transcript import render

log = logging.getLogger(__name__)

STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}


def _static(name: str) -> bytes:
    return resources.files("reactor.observe").joinpath("static", name).read_bytes()


def build_app(observatory: Observatory) -> web.Application:
    app = web.Application()
    routes = web.RouteTableDef()

    @routes.get("/")
    async def index(_: web.Request) -> web.Response:
        return web.Response(body=_static("index.html"), content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store"})

    @routes.get("/static/{name}")
    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            raise web.HTTPNotFound()
        return web.Response(body=_static(name), content_type=STATIC_FILES[name], charset="utf-8")

    @routes.get("/api/v1/tasks")
    async def tasks(_: web.Request) -> web.Response:
        spend = {ns: {"day": day.day, "cost": round(day.cost, 6), "tokens": day.tokens}
                 for ns, day in sorted(observatory.spend.namespaces().items())}
        return web.json_response({"now": utc_iso(), "tasks": [v.to_dict() for v in observatory.views.tasks()],
                                  "spend": spend, "queues": [q.to_dict() for q in observatory.queues.queues()]})

    @routes.get("/api/v1/tasks/{namespace}/{name}")
    async def task(request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        view = observatory.views.get(namespace, name)
        if view is None:
            raise web.HTTPNotFound(text=f"no task {namespace}/{name}")
        timeline: list[dict[str, Any]] = []
        async for record in observatory.transcripts.read(namespace, name):
            if record.get("kind") == "phase":
                timeline.append({"phase": record.get("phase"), "at": record.get("time")})
        return web.json_response({"now": utc_iso(), "task": view.to_dict(), "timeline": timeline})

    @routes.get("/api/v1/tasks/{namespace}/{name}/transcript")
    async def transcript(request: web.Request) -> web.StreamResponse:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        store = observatory.transcripts
        if observatory.views.get(namespace, name) is None and not store.exists(namespace, name):
            raise web.HTTPNotFound(text=f"no transcript of task {namespace}/{name}")
        follow = request.query.get("follow", "") in ("1", "true", "yes")
        text = request.query.get("format", "jsonl") == "text"
        response = web.StreamResponse(headers={
            "Content-Type": "text/plain; charset=utf-8" if text else "application/x-ndjson",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",  # proxies must pass lines through as they come
        })
        await response.prepare(request)
        async for record in store.read(namespace, name, follow=follow):
            line = render(record) if text else json.dumps(record, ensure_ascii=False)
            await response.write((line + "\n").encode())
        await response.write_eof()
        return response

    @routes.get("/metrics")
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(observatory.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    @routes.get("/healthz")
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app.add_routes(routes)
    return app


class WebServer:
    """The app on ``host:port`` inside the running event loop (the operator's, or `reactor run`'s)."""

    def __init__(self, observatory: Observatory, host: str, port: int) -> None:
        self.observatory, self.host, self.port = observatory, host, port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(build_app(self.observatory), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:  # an ephemeral port: report the real one
            server = site._server  # noqa: SLF001 - aiohttp exposes no public accessor
            if server is not None and server.sockets:
                self.port = server.sockets[0].getsockname()[1]
        log.info("web page and /metrics on http://%s:%s/", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def parse_address(value: str, default_port: int = 8081) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``HOST`` (IPv6 in brackets)."""
    host, _, port = value.rpartition(":") if value.rpartition(":")[2].isdigit() else (value, "", "")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port) if port else default_port
