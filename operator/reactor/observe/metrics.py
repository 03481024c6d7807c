"""Prometheus metrics (``/metrics``), prefix ``reactor_``.

Counters and histograms are updated as things happen; gauges that mirror state owned
elsewhere (tasks by phase: the fleet page's task views; cells: the engine's capacity gate) are read at
scrape time by a collector, so there is one owner per number.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from reactor.observe.fleet import TaskViews

TASK_BUCKETS = (5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
PHASE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

CapacityReader = Callable[[], tuple[int, int, int]]  # busy, capacity, waiting


class _StateCollector(Collector):
    def __init__(self, views: TaskViews, capacity: CapacityReader | None) -> None:
        self.views, self.capacity = views, capacity

    def collect(self):
        tasks = GaugeMetricFamily("reactor_tasks", "Tasks known to this process, by namespace and phase",
                                  labels=["namespace", "phase"])
        for (namespace, phase), count in sorted(self.views.by_phase().items()):
            tasks.add_metric([namespace, phase], count)
        yield tasks
        if self.capacity is not None:
            busy, limit, waiting = self.capacity()
            yield GaugeMetricFamily("reactor_cells_busy", "Cells alive (holding a capacity slot)", value=busy)
            yield GaugeMetricFamily("reactor_cells_capacity", "Cells allowed at once (--max-agents)", value=limit)
            yield GaugeMetricFamily("reactor_cells_waiting", "Tasks waiting for a cell", value=waiting)


class Metrics:
    def __init__(self, views: TaskViews, capacity: CapacityReader | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        r.register(_StateCollector(views, capacity))
        self.task_duration = Histogram("reactor_task_duration_seconds", "Whole task, start to verdict",
                                       ["namespace", "outcome"], buckets=TASK_BUCKETS, registry=r)
        self.phase_duration = Histogram("reactor_phase_duration_seconds", "Time spent in each phase",
                                        ["phase"], buckets=PHASE_BUCKETS, registry=r)
        self.tasks_finished = Counter("reactor_tasks_finished_total", "Tasks that reached a verdict",
                                      ["namespace", "outcome", "reason"], registry=r)
        self.failures = Counter("reactor_task_failures_total", "Tasks that did not commit, by reason",
                                ["namespace", "reason"], registry=r)
        self.tokens = Counter("reactor_tokens_total", "Model tokens, as the steps ended",
                              ["namespace", "model", "type"], registry=r)
        self.cost = Counter("reactor_cost_dollars_total", "Model cost in US dollars, as the steps ended",
                            ["namespace", "model"], registry=r)
        self.steps = Counter("reactor_model_steps_total", "Model steps (one model call each)",
                             ["namespace", "model"], registry=r)
        self.tool_calls = Counter("reactor_tool_calls_total", "Tool calls by the agents", ["namespace", "tool"],
                                  registry=r)
        self.boot_retries = Counter("reactor_boot_retries_total", "Server restarts (BOOT_RETRY)", ["namespace"],
                                    registry=r)
        self.r3_retries = Counter("reactor_r3_retries_total", "Prompt retries after transient errors (R3)",
                                  ["namespace"], registry=r)
        self.stops = Counter("reactor_task_stops_total", "Running tasks stopped by a budget or spend limit",
                             ["namespace", "reason"], registry=r)
        self.forge_requests = Counter("reactor_forge_requests_total", "Forge API requests for pull requests",
                                      ["namespace", "forge"], registry=r)
        self.pull_requests = Counter("reactor_pull_requests_total", "Pull request outcomes (PullRequestOpened reasons)",
                                     ["namespace", "reason"], registry=r)
        self.queue_test_runs = Counter("reactor_mergequeue_test_runs_total", "Test runs on merge-queue candidates",
                                       ["namespace", "queue"], registry=r)
        self.queue_results = Counter("reactor_mergequeue_results_total",
                                     "Results that left a merge queue: integrated, or ejected (by reason)",
                                     ["namespace", "queue", "outcome", "reason"], registry=r)
        self.queue_integration = Histogram("reactor_mergequeue_integration_seconds",
                                           "A result's time from entering its merge queue to being on the base branch",
                                           ["namespace", "queue"], buckets=TASK_BUCKETS, registry=r)
        self.status_patches = Counter("reactor_status_patches_total", "Status writes to the API server",
                                      ["kind"], registry=r)
