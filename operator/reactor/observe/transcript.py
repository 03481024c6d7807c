"""Transcripts: what an agent was told and did, one JSON record per line.

Prompts, the agent's text, tool calls with their arguments shortened and results
truncated, each model step's tokens and cost, phase changes. Written live while the task
runs and kept after it ends, bounded in size (past the limit only phase changes and the
end are still written), redacted of the task's secrets, removed with the task.

A :class:`TranscriptStore` owns the files under one directory; a reader can follow a
transcript that is still being written (``follow``) without polling the file: the store
wakes it on every record.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from reactor.opencode.client import is_wrapped_command
from reactor.opencode.events import Event, StepFinished, TextDone, ToolUpdate
from reactor.observe.progress import utc_now
from reactor.redact import Redactor, shorten
from reactor.workflow.types import PhaseEvent

MAX_BYTES = 1 << 20  # per transcript
ARGUMENT_CHARS = 300
RESULT_CHARS = 1000
TEXT_CHARS = 4000
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def _component(value: str) -> str:
    return _SAFE.sub("_", value)[:200] or "_"


class Transcript:
    """The writer of one task's transcript (append-only JSON lines)."""

    def __init__(self, store: TranscriptStore, key: tuple[str, str], redactor: Redactor | None = None,
                 max_bytes: int = MAX_BYTES) -> None:
        self.store, self.key = store, key
        self.path = store.path(*key)
        self.redactor = redactor or Redactor()
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.size = self.path.stat().st_size if self.path.exists() else 0
        self.truncated = False
        self.closed = False

    # -- inputs --

    def on_phase(self, event: PhaseEvent) -> None:
        self.write({"kind": "phase", "phase": event.phase.value, "message": event.message}, essential=True)

    def on_event(self, event: Event) -> None:
        if isinstance(event, TextDone):
            if event.role == "user" and event.synthetic:
                return  # OpenCode's own note before a shell run
            kind = "prompt" if event.role == "user" else "text"
            self.write({"kind": kind, "text": shorten(event.text, TEXT_CHARS)})
        elif isinstance(event, ToolUpdate):
            if is_wrapped_command(str(event.input.get("command") or "")):
                return  # Reactor's own test run: the phase record says it
            if event.status == "running":
                self.write({"kind": "tool", "tool": event.tool, "call": event.call_id,
                            "input": shorten(json.dumps(event.input, ensure_ascii=False), ARGUMENT_CHARS)})
            elif event.status in ("completed", "error"):
                result = event.error if event.status == "error" else (event.output or "")
                self.write({"kind": "result", "tool": event.tool, "call": event.call_id, "status": event.status,
                            "output": shorten(result or "", RESULT_CHARS)})
        elif isinstance(event, StepFinished):
            self.write({"kind": "step", "tokens": event.tokens.total_tokens, "cost": round(event.cost, 6),
                        "reason": event.reason})

    def note(self, text: str) -> None:
        self.write({"kind": "note", "text": text}, essential=True)

    def close(self, outcome: str, reason: str, message: str) -> None:
        if not self.closed:
            self.write({"kind": "end", "outcome": outcome, "reason": reason, "message": message}, essential=True)
            self.closed = True
            self.store._closed(self.key)

    # -- writing --

    def write(self, record: dict[str, Any], essential: bool = False) -> None:
        if self.closed:
            return
        if self.truncated and not essential:
            return
        record = {"time": utc_now(), **self.redactor.data(record)}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if not essential and self.size + len(line) > self.max_bytes:
            self.truncated = True
            line = json.dumps({"time": record["time"], "kind": "truncated",
                               "text": f"transcript reached its limit of {self.max_bytes} bytes; "
                                       "only phase changes follow"}) + "\n"
        data = line.encode()
        with open(self.path, "ab") as out:
            out.write(data)
        self.size += len(data)
        self.store._written(self.key)


class TranscriptStore:
    """Transcripts of many tasks under one directory: ``<dir>/<namespace>/<name>.jsonl``."""

    def __init__(self, directory: Path, max_bytes: int = MAX_BYTES) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._live: dict[tuple[str, str], Transcript] = {}
        self._signals: dict[tuple[str, str], asyncio.Event] = {}  # set on the next write

    def append(self, namespace: str, name: str, record: dict[str, Any]) -> None:
        """A record after the task's end (its pull request): added to an existing transcript only."""
        path = self.path(namespace, name)
        if not path.exists():
            return
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"time": utc_now(), **record}, ensure_ascii=False) + "\n")
        self._notify((namespace, name))

    def path(self, namespace: str, name: str) -> Path:
        return self.directory / _component(namespace) / f"{_component(name)}.jsonl"

    def open(self, namespace: str, name: str, redactor: Redactor | None = None) -> Transcript:
        """The writer for a task (appends: a task run again keeps its earlier attempts)."""
        key = (namespace, name)
        transcript = Transcript(self, key, redactor, self.max_bytes)
        self._live[key] = transcript
        return transcript

    def exists(self, namespace: str, name: str) -> bool:
        return self.path(namespace, name).exists()

    def live(self, namespace: str, name: str) -> bool:
        return (namespace, name) in self._live

    def remove(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        transcript = self._live.pop(key, None)
        if transcript is not None:
            transcript.closed = True
        try:
            os.unlink(self.path(namespace, name))
        except FileNotFoundError:
            pass
        self._notify(key)

    def _written(self, key: tuple[str, str]) -> None:
        self._notify(key)

    def _closed(self, key: tuple[str, str]) -> None:
        self._live.pop(key, None)
        self._notify(key)

    def _notify(self, key: tuple[str, str]) -> None:
        signal = self._signals.pop(key, None)
        if signal is not None:
            signal.set()

    async def read(self, namespace: str, name: str, follow: bool = False) -> AsyncIterator[dict[str, Any]]:
        """The records so far; with ``follow``, then new ones as they are written, until the
        task's transcript is closed (the task ended) or removed."""
        key = (namespace, name)
        path = self.path(namespace, name)
        offset, partial = 0, b""
        while True:
            # Taken before reading: a record written meanwhile sets it, so none is missed.
            signal = self._signals.setdefault(key, asyncio.Event())
            still_written = key in self._live  # decided before reading: the end record is read
            try:
                with open(path, "rb") as source:
                    source.seek(offset)
                    chunk = source.read()
            except FileNotFoundError:
                chunk = b""
            offset += len(chunk)
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()
            for line in lines:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError:
                        continue
            if not follow or not still_written:
                return
            if not chunk:
                await signal.wait()


# C0 and C1 control characters but newline and tab: a terminal obeys them (colours, cursor
# moves that overwrite lines shown, a title, OSC 52's write to the clipboard).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """A cell's text as a terminal may show it: its control characters as escapes."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def render(record: dict[str, Any]) -> str:
    """One transcript record as a line of text (``reactor logs``). The text is the cell's (its
    agent's words, its commands' output): its control characters are shown as escapes, never
    sent to the reader's terminal as they are."""
    return printable(_render(record))


def _render(record: dict[str, Any]) -> str:
    when = str(record.get("time", ""))[11:19]
    kind = record.get("kind")
    if kind == "phase":
        message = f": {record['message']}" if record.get("message") else ""
        return f"{when} == {record.get('phase')}{message}"
    if kind == "prompt":
        return f"{when} >> prompt: {record.get('text', '')}"
    if kind == "text":
        return f"{when} << {record.get('text', '')}"
    if kind == "tool":
        return f"{when} -> {record.get('tool')} {record.get('input', '')}"
    if kind == "result":
        output = str(record.get("output", "")).rstrip()
        marker = "!!" if record.get("status") == "error" else "<-"
        if "\n" in output:
            output = "\n" + "\n".join("     | " + line for line in output.splitlines())
        return f"{when} {marker} {record.get('tool')}: {output}"
    if kind == "step":
        return f"{when} .. step: {record.get('tokens')} tokens, ${record.get('cost', 0):.4f} ({record.get('reason')})"
    if kind == "pullRequest":
        return f"{when} == pull request ({record.get('state')}): {record.get('url')}"
    if kind == "end":
        return f"{when} == end: {record.get('outcome')} ({record.get('reason')}): {record.get('message', '')}"
    return f"{when} -- {record.get('text', kind)}"
