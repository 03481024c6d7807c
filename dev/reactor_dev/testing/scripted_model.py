"""A scripted OpenAI-compatible model server for tests and the offline demo.

OpenCode talks to it as a provider (``@ai-sdk/openai-compatible``) over real HTTP on
127.0.0.1. Each task gets its own *scenario*, chosen by a marker string in the
conversation's first user message (the prompt), so many cells can share one server::

    script = Script([
        Scenario("TASK-001", [write("hello.txt", "hi\\n"), text("done")]),
        Scenario("TASK-002", [fail(500), bash("make test"), text("ok")]),
    ])
    with ScriptedModel(script) as model:
        config = model.opencode_config()   # -> OPENCODE_CONFIG_CONTENT

Which step to play is derived from the conversation itself (the number of assistant
turns already in ``messages``), so the server is stateless and safe for parallel
conversations. Only ``fail``, ``hang`` and ``empty`` keep state (a per-step counter):
they fire ``times`` times and are then skipped, so a retry gets past them. They never
produce an assistant turn, so they do not shift the numbering of the other steps.

Concurrency is counted where it happens: ``peak_in_flight`` is the largest number of
distinct scenarios (cells) that had a request open at the same moment, updated under a
lock as each request starts and ends (give steps a ``delay`` so that cells overlap).

Requests that carry no ``tools`` (OpenCode's own auxiliary calls, such as session title
generation) and conversations that match no scenario get a short plain-text answer.

``latency`` (seconds) delays every answer by a fixed time, as a real model takes seconds per
turn: with it, a benchmark's throughput is bound by how many cells run at once, not by this
machine's cores. Each logged request records when its answer was sent (``answered``) and
the cell's working directory (``workdir``), so tests can tell which cell asked when.

Only the standard library is used (``http.server`` in a background thread), so sync
tests, async tests and the demo CLI can all share it.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable

__all__ = [
    "Step",
    "Scenario",
    "Script",
    "ScriptedModel",
    "write",
    "edit",
    "bash",
    "text",
    "fail",
    "hang",
    "wait_for",
    "set_event",
    "empty",
    "DEFAULT_MODEL",
    "PROVIDER_ID",
]

PROVIDER_ID = "scripted"
DEFAULT_MODEL = "scripted-1"
AUXILIARY_ANSWER = "Scripted task"
UNMATCHED_ANSWER = "No scripted scenario matches this conversation."
# How long a ``together`` step waits for its peers before answering anyway.
TOGETHER_TIMEOUT = 60.0
# Default per-step token usage reported in the final chunk.
DEFAULT_USAGE = (100, 20)


# --------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Step:
    """One model answer. Build steps with the helper functions below."""

    kind: str  # "tool" | "text" | "fail" | "hang" | "empty" | "wait" | "set"
    tool: str | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    content: str = ""
    status: int = 500
    times: int = 1
    usage: tuple[int, int] = DEFAULT_USAGE
    retry_after: float | None = None
    message: str | None = None  # fail: the error's text
    delay: float = 0.0  # seconds the model "thinks" before answering (a slow model)
    event: threading.Event | None = field(default=None, compare=False)
    delay: float = 0.0  # seconds the server waits before answering (holds the request open)
    together: int = 0  # hold the request until this many scenarios have had one open at once (peak_in_flight)

    @property
    def stateful(self) -> bool:
        """fail/hang/empty/wait/set steps fire a number of times and produce no assistant turn."""
        return self.kind in ("fail", "hang", "empty", "wait", "set")


def write(path: str, content: str, *, usage: tuple[int, int] = DEFAULT_USAGE, delay: float = 0.0,
          together: int = 0) -> Step:
    """OpenCode's ``write`` tool. A relative path is resolved against the working
    directory OpenCode reports in its system prompt."""
    return Step("tool", tool="write", arguments={"filePath": path, "content": content}, usage=usage, delay=delay,
                together=together)


def edit(path: str, old: str, new: str, *, usage: tuple[int, int] = DEFAULT_USAGE, delay: float = 0.0,
         together: int = 0) -> Step:
    """OpenCode's ``edit`` tool: replace the exact string ``old`` (which must occur once)
    with ``new``. OpenCode 1.18 does not require a prior ``read``.

    ``delay`` holds the request open that long before answering; ``together`` holds it
    until ``peak_in_flight`` reaches that many scenarios (cells) with a request open at
    once (or TOGETHER_TIMEOUT passes), so a test sees a concurrency limit reached rather
    than hopes for overlap."""
    return Step(
        "tool",
        tool="edit",
        arguments={"filePath": path, "oldString": old, "newString": new},
        usage=usage,
        delay=delay,
        together=together,
    )


def bash(command: str, *, usage: tuple[int, int] = DEFAULT_USAGE, delay: float = 0.0) -> Step:
    """OpenCode's ``bash`` tool (runs in the project directory)."""
    return Step("tool", tool="bash", arguments={"command": command}, usage=usage, delay=delay)


def text(content: str, *, usage: tuple[int, int] = DEFAULT_USAGE, delay: float = 0.0, together: int = 0) -> Step:
    """A plain text answer with finish_reason "stop": ends the agent's turn."""
    return Step("text", content=content, usage=usage, delay=delay, together=together)


def fail(status: int = 500, times: int = 1, *, retry_after: float | None = None, message: str | None = None) -> Step:
    """Answer with HTTP ``status`` ``times`` times, then continue with the next step.

    ``message``: the error's text (a real provider's 401 quotes the key it was given).

    ``retry_after`` (seconds) adds ``retry-after-ms``/``retry-after`` headers, which
    OpenCode honours for its own retry delay (default backoff: about 2, 4, 8, 16, 32 s)."""
    if times < 1:
        raise ValueError("times must be >= 1")
    return Step("fail", status=status, times=times, retry_after=retry_after, message=message)


def hang(times: int = 1) -> Step:
    """Accept the request and never answer (until the client goes away or the server
    stops), ``times`` times; then continue with the next step."""
    if times < 1:
        raise ValueError("times must be >= 1")
    return Step("hang", times=times)


def wait_for(event: threading.Event) -> Step:
    """Hold this request until ``event`` is set (or the server stops), then answer it with
    the next step: orders steps across conversations (cells) without sleeping."""
    return Step("wait", event=event)


def set_event(event: threading.Event) -> Step:
    """Set ``event`` (releasing a ``wait_for`` elsewhere), then answer with the next step."""
    return Step("set", event=event)


def empty(times: int = 1) -> Step:
    """Answer with a stream that holds no chunk at all (``data: [DONE]`` only), ``times``
    times; then continue with the next step. A provider glitch OpenCode does not handle
    well: it is how an agent stalls without failing."""
    if times < 1:
        raise ValueError("times must be >= 1")
    return Step("empty", times=times)


@dataclass(frozen=True)
class Scenario:
    """The steps for conversations whose first user message contains ``match``."""

    match: str
    steps: list[Step]


class Script:
    """A list of scenarios; the first whose ``match`` occurs in the prompt wins."""

    def __init__(self, scenarios: Iterable[Scenario] = ()) -> None:
        self.scenarios = list(scenarios)

    def add(self, scenario: Scenario) -> Scenario:
        """Add a scenario (also while the server runs: tests sharing one server)."""
        self.scenarios.append(scenario)
        return scenario

    def find(self, prompt: str) -> tuple[int, Scenario] | None:
        for index, scenario in enumerate(self.scenarios):
            if scenario.match in prompt:
                return index, scenario
        return None


# --------------------------------------------------------------------- conversation


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part.get("text", "") for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _first_user_text(messages: list[dict[str, Any]]) -> str:
    for message in messages:
        if message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


_WORKDIR_RE = re.compile(r"Working directory:\s*(\S+)")


def _working_directory(messages: list[dict[str, Any]]) -> str | None:
    """OpenCode's system prompt has an <env> block with ``Working directory: /abs``."""
    for message in messages:
        if message.get("role") == "system":
            found = _WORKDIR_RE.search(_content_text(message.get("content")))
            if found:
                return found.group(1)
    return None


# OpenCode records a command run through POST /session/{id}/shell as a user message
# with this text followed by an assistant message carrying the bash call; the model sees
# both on the next prompt. They are not the model's turns.
_USER_SHELL_TEXT = "The following tool was executed by the user"


def _model_turns(messages: list[dict[str, Any]]) -> int:
    """Assistant messages the model produced (user-run shell commands excluded)."""
    turns = 0
    previous_user = ""
    for message in messages:
        role = message.get("role")
        if role == "user":
            previous_user = _content_text(message.get("content"))
        elif role == "assistant":
            if not previous_user.startswith(_USER_SHELL_TEXT):
                turns += 1
            previous_user = ""
    return turns


@dataclass
class _Decision:
    kind: str  # "auxiliary" | "unmatched" | "tool" | "text" | "fail" | "hang" | "empty" | "exhausted"
    scenario: str | None = None
    step_index: int | None = None
    step: Step | None = None


# --------------------------------------------------------------------------- server


class ScriptedModel:
    """The server. ``ScriptedModel(script).start()`` or use it as a context manager."""

    def __init__(
        self,
        script: Script | Iterable[Scenario] = (),
        *,
        model: str = DEFAULT_MODEL,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
    ) -> None:
        if latency < 0:
            raise ValueError("latency must be >= 0")
        self.script = script if isinstance(script, Script) else Script(script)
        self.model = model
        self.latency = latency
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._fired: dict[tuple[int, int], int] = {}  # (scenario, step) -> times fired
        self._requests: list[dict[str, Any]] = []
        self._in_flight: dict[str, int] = {}  # scenario -> requests open now
        self._peak_in_flight = 0
        self._in_flight_changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> "ScriptedModel":
        if self._server is not None:
            return self
        owner = self

        class Handler(_Handler):
            model_server = owner

        server = ThreadingHTTPServer((self._host, self._port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="scripted-model", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()  # releases hanging handlers
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "ScriptedModel":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("ScriptedModel is not running")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}/v1"

    @property
    def requests(self) -> list[dict[str, Any]]:
        """A copy of the log: one dict per request (path, body, kind, scenario, step,
        answer)."""
        with self._lock:
            return list(self._requests)

    @property
    def peak_in_flight(self) -> int:
        """The most scenarios (cells) that had a request open at one moment (auxiliary
        and unmatched requests are not counted)."""
        with self._lock:
            return self._peak_in_flight

    def _enter(self, scenario: str | None) -> None:
        if scenario is None:
            return
        with self._lock:
            self._in_flight[scenario] = self._in_flight.get(scenario, 0) + 1
            self._peak_in_flight = max(self._peak_in_flight, len(self._in_flight))
            self._in_flight_changed.notify_all()

    def _wait_for_peers(self, count: int) -> None:
        deadline = time.monotonic() + TOGETHER_TIMEOUT
        with self._lock:
            # The peak, not the current count: once reached, every waiter goes (the first
            # to answer must not hold the others back by leaving).
            while self._peak_in_flight < count and not self._stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._in_flight_changed.wait(min(left, 0.1))

    def _leave(self, scenario: str | None) -> None:
        if scenario is None:
            return
        with self._lock:
            left = self._in_flight.get(scenario, 1) - 1
            if left:
                self._in_flight[scenario] = left
            else:
                self._in_flight.pop(scenario, None)

    def opencode_config(self, *, permissions: dict[str, Any] | None = None) -> dict[str, Any]:
        """Config to merge into OpenCode's (e.g. JSON in OPENCODE_CONFIG_CONTENT)."""
        model_id = f"{PROVIDER_ID}/{self.model}"
        return {
            "$schema": "https://opencode.ai/config.json",
            "provider": {
                PROVIDER_ID: {
                    "npm": "@ai-sdk/openai-compatible",
                    "name": "Scripted",
                    "options": {"baseURL": self.base_url, "apiKey": "scripted"},
                    "models": {
                        self.model: {
                            "name": self.model,
                            "tool_call": True,
                            # $ per million tokens, so cost accounting can be tested.
                            "cost": {"input": 3, "output": 15},
                            "limit": {"context": 200000, "output": 32000},
                        }
                    },
                }
            },
            "model": model_id,
            "small_model": model_id,
            "permission": permissions
            or {"edit": "allow", "bash": "allow", "external_directory": "deny"},
        }

    # -- the script engine

    def _decide(self, body: dict[str, Any]) -> _Decision:
        messages = body.get("messages") or []
        if not body.get("tools"):
            return _Decision("auxiliary")
        found = self.script.find(_first_user_text(messages))
        if found is None:
            return _Decision("unmatched")
        scenario_index, scenario = found
        turns = _model_turns(messages)
        # Walk the steps: stateless steps are numbered by assistant turns; a stateful
        # step (fail/hang) in front of the current one fires until exhausted.
        produced = 0
        with self._lock:
            for index, step in enumerate(scenario.steps):
                if step.stateful:
                    if produced == turns:
                        key = (scenario_index, index)
                        fired = self._fired.get(key, 0)
                        if fired < step.times:
                            self._fired[key] = fired + 1
                            return _Decision(step.kind, scenario.match, index, step)
                    continue
                if produced == turns:
                    return _Decision(step.kind, scenario.match, index, step)
                produced += 1
        return _Decision("exhausted", scenario.match)

    def _log(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._requests.append(entry)


class _Handler(BaseHTTPRequestHandler):
    model_server: ScriptedModel
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        if self.path.rstrip("/").endswith("/models"):
            server = self.model_server
            self._send_json(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
        else:
            self._send_json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._send_json(400, {"error": {"message": "invalid JSON"}})
            return
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})
            return
        server = self.model_server
        decision = server._decide(body)
        while decision.kind in ("wait", "set"):  # synchronisation steps: act, then answer with the next
            assert decision.step is not None and decision.step.event is not None
            if decision.kind == "set":
                decision.step.event.set()
            else:
                while not decision.step.event.wait(0.1):
                    if server._stopping.is_set():
                        return
            decision = server._decide(body)
        entry: dict[str, Any] = {
            "time": time.time(),
            "path": self.path,
            "body": body,
            "kind": decision.kind,
            "scenario": decision.scenario,
            "step": decision.step_index,
            "workdir": _working_directory(body.get("messages") or []),
        }
        server._log(entry)
        server._enter(decision.scenario)
        try:
            if server.latency and decision.kind != "hang" and server._stopping.wait(server.latency):
                self.close_connection = True  # the server is stopping: do not answer
                return
            self._play(decision, entry, body)
        finally:
            entry["answered"] = time.time()
            server._leave(decision.scenario)

    def _play(self, decision: _Decision, entry: dict[str, Any], body: dict[str, Any]) -> None:
        step = decision.step
        stream = bool(body.get("stream"))
        if step is not None and step.delay and self.model_server._stopping.wait(step.delay):
            self.close_connection = True
            return
        if step is not None and step.together:
            self.model_server._wait_for_peers(step.together)
        if decision.kind == "fail":
            assert step is not None
            entry["answer"] = f"http {step.status}"
            headers = {}
            if step.retry_after is not None:
                headers["retry-after-ms"] = str(int(step.retry_after * 1000))
                headers["retry-after"] = str(max(0, round(step.retry_after)))
            self._send_json(
                step.status,
                {"error": {"message": step.message or f"scripted failure ({step.status})", "type": "scripted_error",
                           "code": step.status}},
                headers,
            )
        elif decision.kind == "hang":
            entry["answer"] = "hang"
            self._hang()
        elif decision.kind == "empty":
            entry["answer"] = "empty"
            data = b"data: [DONE]\n\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif decision.kind == "tool":
            assert step is not None
            arguments = dict(step.arguments)
            path = arguments.get("filePath")
            if isinstance(path, str) and not os.path.isabs(path):
                workdir = _working_directory(body.get("messages") or [])
                if workdir:
                    arguments["filePath"] = os.path.join(workdir, path)
            call = {"id": f"call_{uuid.uuid4().hex[:12]}", "name": step.tool, "arguments": json.dumps(arguments)}
            entry["answer"] = f"tool {step.tool}"
            self._answer(stream, content=None, tool_call=call, usage=step.usage)
        else:
            if decision.kind == "text":
                assert step is not None
                content, usage = step.content, step.usage
            elif decision.kind == "auxiliary":
                content, usage = AUXILIARY_ANSWER, (10, 3)
            elif decision.kind == "exhausted":
                content, usage = "Script finished.", DEFAULT_USAGE
            else:
                content, usage = UNMATCHED_ANSWER, DEFAULT_USAGE
            entry["answer"] = "text"
            self._answer(stream, content=content, tool_call=None, usage=usage)

    # -- answers

    def _hang(self) -> None:
        """Block until the server stops or the client closes the connection."""
        stopping = self.model_server._stopping
        while not stopping.wait(0.1):
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                if readable and not self.connection.recv(1, socket.MSG_PEEK):
                    return  # client closed the connection
            except OSError:
                return
        self.close_connection = True

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _answer(
        self,
        stream: bool,
        *,
        content: str | None,
        tool_call: dict[str, str] | None,
        usage: tuple[int, int],
    ) -> None:
        model = self.model_server.model
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:16]}"
        created = int(time.time())
        usage_payload = {
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "total_tokens": usage[0] + usage[1],
        }
        finish = "tool_calls" if tool_call else "stop"
        if not stream:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if tool_call:
                message["tool_calls"] = [
                    {"id": tool_call["id"], "type": "function",
                     "function": {"name": tool_call["name"], "arguments": tool_call["arguments"]}}
                ]
            self._send_json(
                200,
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": usage_payload,
                },
            )
            return

        def chunk(delta: dict[str, Any], finish_reason: str | None, **extra: Any) -> bytes:
            payload = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                **extra,
            }
            return f"data: {json.dumps(payload)}\n\n".encode()

        events = [chunk({"role": "assistant", "content": ""}, None)]
        if tool_call:
            events.append(
                chunk(
                    {"tool_calls": [{"index": 0, "id": tool_call["id"], "type": "function",
                                     "function": {"name": tool_call["name"], "arguments": tool_call["arguments"]}}]},
                    None,
                )
            )
        elif content:
            events.append(chunk({"content": content}, None))
        events.append(chunk({}, finish, usage=usage_payload))
        events.append(b"data: [DONE]\n\n")
        data = b"".join(events)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
