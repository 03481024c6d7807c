"""Wiring: one :class:`Observatory` per process (task views, metrics, transcripts, spend), one
:class:`TaskObservation` per task run, fed by the engine (phase callback, cell events)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from reactor.opencode.client import is_wrapped_command
from reactor.opencode.events import Event, StepFinished, ToolUpdate
from reactor.observe.fleet import QueueViews, SpendLedger, TaskViews, utc_iso
from reactor.observe.metrics import CapacityReader, Metrics
from reactor.observe.progress import Milestone, ProgressTracker
from reactor.redact import Redactor
from reactor.observe.transcript import TranscriptStore
from reactor.workflow.control import TaskControl
from reactor.workflow.types import Phase, PhaseEvent, TaskResult

log = logging.getLogger(__name__)

LOCAL_NAMESPACE = "local"  # the namespace label of `reactor run` tasks


class Observatory:
    def __init__(self, transcripts_dir: Path, capacity: CapacityReader | None = None) -> None:
        self.views = TaskViews()
        self.queues = QueueViews()  # the merge queues this process drives (kube/mergequeues.py)
        self.spend = SpendLedger()
        self.metrics = Metrics(self.views, capacity)
        self.transcripts = TranscriptStore(transcripts_dir)

    def observe(self, namespace: str, name: str, control: TaskControl, secrets: list[str] | None = None,
                on_milestone: Callable[[Milestone], None] | None = None) -> TaskObservation:
        return TaskObservation(self, namespace, name, control, Redactor(secrets or ()), on_milestone)

    def pull_request(self, namespace: str, name: str, url: str, state: str) -> None:
        """The task's pull request was opened, or changed state: on the page and in its transcript."""
        view = self.views.view(namespace, name)
        view.pull_request, view.pull_request_state = url, state
        self.transcripts.append(namespace, name, {"kind": "pullRequest", "url": url, "state": state})

    def forget(self, namespace: str, name: str) -> None:
        """The task is gone (deleted): its view and its transcript go too."""
        self.views.remove(namespace, name)
        self.transcripts.remove(namespace, name)


class TaskObservation:
    """Everything observed about one task run. Pass ``on_phase`` and ``on_event`` to the
    engine (``run_task(..., on_phase=..., watchers=[obs.on_event])``), ``finish`` the result."""

    def __init__(self, observatory: Observatory, namespace: str, name: str, control: TaskControl,
                 redactor: Redactor, on_milestone: Callable[[Milestone], None] | None) -> None:
        self.observatory, self.namespace, self.name = observatory, namespace, name
        self.control = control
        self.redactor = redactor
        self._on_milestone = on_milestone
        self.progress = ProgressTracker(control, redactor, self._milestone)
        self.transcript = observatory.transcripts.open(namespace, name, redactor)
        self.view = observatory.views.view(namespace, name)
        self.milestones: list[Milestone] = []

    # -- inputs from the engine --

    def on_phase(self, event: PhaseEvent) -> None:
        if event.phase.terminal:
            return  # the verdict comes with finish() (the front end may still change it)
        self.progress.on_phase(event)
        self.transcript.on_phase(event)
        view = self.view
        view.phase, view.message = event.phase.value, self.redactor.text(event.message)
        if event.phase is Phase.BOOTSTRAPPING and view.started is None:
            view.started = utc_iso()
        view.activity = self.progress.activity

    def on_event(self, event: Event) -> None:
        self.progress.on_event(event)
        self.transcript.on_event(event)
        metrics, view = self.observatory.metrics, self.view
        if isinstance(event, StepFinished):
            model = event.model or self.progress.model or "unknown"
            tokens = event.tokens
            for kind, count in (("input", tokens.input_tokens), ("output", tokens.output_tokens),
                                ("reasoning", tokens.reasoning_tokens), ("cache_read", tokens.cache_read_tokens),
                                ("cache_write", tokens.cache_write_tokens)):
                if count:
                    metrics.tokens.labels(self.namespace, model, kind).inc(count)
            metrics.cost.labels(self.namespace, model).inc(event.cost)
            metrics.steps.labels(self.namespace, model).inc()
            self.observatory.spend.add(self.namespace, event.cost, tokens.total_tokens)
            view.model = model
        elif isinstance(event, ToolUpdate) and event.status == "running":
            if not is_wrapped_command(str(event.input.get("command") or "")):
                metrics.tool_calls.labels(self.namespace, event.tool).inc()
        spend = self.control.spend
        view.cost, view.tokens = spend.cost, spend.total_tokens
        view.activity = self.progress.activity
        view.files = list(self.progress.files)

    def note(self, text: str) -> None:
        self.transcript.note(self.redactor.text(text))

    # -- the end --

    def finish(self, result: TaskResult, phase: Phase | None = None) -> None:
        """Record the verdict (``phase`` when the front end's final phase differs from the
        engine's, e.g. a failed push)."""
        metrics, view = self.observatory.metrics, self.view
        outcome, reason = result.outcome.value, result.reason.value
        metrics.tasks_finished.labels(self.namespace, outcome, reason).inc()
        if not result.succeeded:
            metrics.failures.labels(self.namespace, reason).inc()
        if reason in ("BudgetExceeded", "SpendLimitExceeded"):
            metrics.stops.labels(self.namespace, reason).inc()
        metrics.task_duration.labels(self.namespace, outcome).observe(result.duration)
        for name, seconds in result.phase_durations.items():
            metrics.phase_duration.labels(name).observe(seconds)
        if result.boot_attempts > 1:
            metrics.boot_retries.labels(self.namespace).inc(result.boot_attempts - 1)
        if result.prompt_attempts > 1:
            metrics.r3_retries.labels(self.namespace).inc(result.prompt_attempts - 1)
        final = phase or (Phase.SUCCEEDED if result.succeeded else Phase.FAILED)
        view.phase, view.reason = final.value, reason
        view.message = self.redactor.text(result.message)
        view.finished = utc_iso()
        view.activity = ""
        view.commit = result.commit
        view.files = list(result.files_changed) or view.files
        # The server's own totals are exact (the stream may have gaps); prefer them when larger.
        view.cost = max(view.cost, result.usage.cost)
        view.tokens = max(view.tokens, result.usage.total_tokens)
        self.transcript.on_phase(PhaseEvent(task_id=result.task_id, phase=final, message=view.message))
        self.transcript.close(outcome, reason, view.message)

    def _milestone(self, milestone: Milestone) -> None:
        self.milestones.append(milestone)
        self.transcript.note(f"{milestone.reason}: {milestone.message}")
        if self._on_milestone is not None:
            self._on_milestone(milestone)
