"""`reactor operator`: run the AgentTask operator (kopf) with one engine."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from reactor.cli.common import add_engine_flags, engine_settings_from


def add_subparser(sub: Any) -> None:
    parser = sub.add_parser("operator", help="run the AgentTask operator against the current kubeconfig or in-cluster")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=None,
                       help="watch this namespace (repeatable; default: $WATCH_NAMESPACE, else all namespaces)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    add_engine_flags(parser)
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                        help="liveness endpoint (default: http://0.0.0.0:8080/healthz; 'none' to disable)")
    parser.set_defaults(func=cmd_operator)


def cmd_operator(args: argparse.Namespace) -> int:
    import kopf
    import kubernetes

    from reactor.kube.handlers import registry
    from reactor.kube.supervisor import TaskSupervisor
    from reactor.workflow.engine import Engine

    # An operator's log is what `kubectl logs` shows: each task's progress (its phases) at INFO.
    if not getattr(args, "verbose", False):
        logging.getLogger("reactor").setLevel(logging.INFO)
    namespaces = args.namespace or [ns for ns in os.environ.get("WATCH_NAMESPACE", "").split(",") if ns]
    clusterwide = args.all_namespaces or not namespaces
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    # Servers must not inherit the operator's environment: only their task's secrets.
    engine = Engine(engine_settings_from(args, inherit_env=False))
    supervisor = TaskSupervisor(engine, kubernetes.client.ApiClient())
    kopf.run(
        registry=registry,
        memo=kopf.Memo(supervisor=supervisor),
        standalone=True,  # one replica (Deployment strategy Recreate): no peering
        clusterwide=clusterwide,
        namespaces=namespaces,
        liveness_endpoint=None if args.liveness == "none" else args.liveness,
    )
    return 0
