"""Observability shared by `reactor run` and the operator: live progress of each cell from
its OpenCode event stream, transcripts, Prometheus metrics, the fleet view and its web page.

Above `workflow/` (it consumes the engine's phase callbacks and the cells' events), below
`kube/` and the CLI (which feed it and publish what it computes). Knows nothing of
Kubernetes: tasks are keyed by a (namespace, name) pair, namespace "local" for `reactor run`.
"""
