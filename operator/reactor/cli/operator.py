"""`reactor operator`: run the AgentTask operator (kopf) with one engine."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from reactor.cli.common import add_engine_flags, claim_private_dirs, engine_settings_from


def add_subparser(sub: Any) -> None:
    parser = sub.add_parser("operator", help="run the AgentTask operator against the current kubeconfig or in-cluster")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=None,
                       help="watch this namespace (repeatable; default: $WATCH_NAMESPACE, else all namespaces)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    add_engine_flags(parser)
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                        help="liveness endpoint (default: http://0.0.0.0:8080/healthz; 'none' to disable)")
    parser.add_argument("--web", default="none", metavar="HOST:PORT",
                        help="serve the fleet page, transcripts (`reactor logs`) and /metrics here, e.g. 0.0.0.0:8081 "
                             "(default: none)")
    parser.add_argument("--allow-file-urls", action="append", default=[], metavar="PREFIX", type=_absolute_path,
                        help="fetch file:// repositories under this path (repeatable; default: none, file:// is "
                             "refused). Never inside --work-dir, whatever this allows")
    parser.add_argument("--cells-outlive-operator", action="store_true",
                        help="a cell is not stopped when this process dies, only by its task's time box, so the next "
                             "operator reattaches to the agent's running turn (spec.resume: reattach) instead of "
                             "reopening its session. For an operator run outside a pod; no effect on a clean stop "
                             "(SIGTERM), which stops every cell (default: cells end with the operator)")
    parser.add_argument("--progress-interval", default="2s",
                        help="at most one status.progress write per task this often; 0: none while it runs (default: 2s)")
    forge = parser.add_argument_group("pull requests (spec.result.kind pullRequest)")
    forge.add_argument("--forge-token-secret", default=None, metavar="NAME",
                       help="the Secret (in each task's namespace, key `token`) holding the forge API token for tasks "
                            "without spec.result.tokenSecretRef (default: none)")
    forge.add_argument("--forge-host", action="append", default=[], metavar="HOST[:PORT]",
                       help="a forge the --forge-token-secret token may be sent to (repeatable; the forge is read "
                            "from each task's repository URL, so without this the default token is sent nowhere)")
    forge.add_argument("--pr-check-interval", default="60s",
                       help="how often open pull requests are checked for merged/closed (default: 60s)")
    queues = parser.add_argument_group("merge queues (spec.integrate: queue)")
    queues.add_argument("--rebase-rounds", type=_rounds, default=2, metavar="N",
                        help="a queued result that conflicts textually with the base branch sends its task back to "
                             "a cell to rebase it this many times, then the task fails with reason Conflict "
                             "(default: 2; 0: Conflict at once)")
    fleet = parser.add_argument_group("many replicas (a StatefulSet; see manifests-fleet)")
    fleet.add_argument("--fleet", action="store_true",
                       help="share the tasks with other replicas through Leases and claims")
    fleet.add_argument("--replica-id", default=None,
                       help="this replica's stable name (default: $POD_NAME, else the host name)")
    fleet.add_argument("--lease-namespace", default=None,
                       help="namespace of the replicas' Leases (default: $POD_NAMESPACE, else the first watched one)")
    fleet.add_argument("--lease-duration", default="15s",
                       help="a replica whose Lease is not renewed for this long is considered gone (default: 15s)")
    parser.set_defaults(func=cmd_operator)


def _rounds(value: str) -> int:
    try:
        rounds = int(value)
    except ValueError:
        rounds = -1
    if rounds < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of rounds (0 or more)")
    return rounds


def _absolute_path(value: str):
    from pathlib import Path

    path = Path(value).expanduser()
    if not path.is_absolute():
        raise argparse.ArgumentTypeError(f"{value!r} is not an absolute path")
    return path


def fleet_settings_from(args: argparse.Namespace, namespaces: list[str]):
    import socket

    from reactor.durations import parse_duration
    from reactor.errors import ConfigurationError
    from reactor.kube.fleet import FleetSettings

    replica = args.replica_id or os.environ.get("POD_NAME") or socket.gethostname()
    namespace = args.lease_namespace or os.environ.get("POD_NAMESPACE") or (namespaces[0] if namespaces else None)
    if not namespace:
        raise ConfigurationError("--fleet needs --lease-namespace (or $POD_NAMESPACE) when watching all namespaces")
    try:
        return FleetSettings(replica=replica, namespace=namespace, lease_duration=parse_duration(args.lease_duration))
    except ValueError as exc:
        raise ConfigurationError(f"--lease-duration: {exc}") from None


def cmd_operator(args: argparse.Namespace) -> int:
    claim_private_dirs(args)  # first: the kubeconfig's client key goes to a temp file
    import kopf
    import kubernetes

    from reactor.durations import parse_duration
    from reactor.kube.handlers import fleet_registry, registry
    from reactor.kube.pullrequests import PullRequestSettings
    from reactor.kube.supervisor import Supervisor
    from reactor.observe.web import WebServer, parse_address
    from reactor.workflow.engine import Engine

    # An operator's log is what `kubectl logs` shows: each task's progress (its phases) at INFO.
    if not getattr(args, "verbose", False):
        logging.getLogger("reactor").setLevel(logging.INFO)
    namespaces = args.namespace or [ns for ns in os.environ.get("WATCH_NAMESPACE", "").split(",") if ns]
    clusterwide = args.all_namespaces or not namespaces
    fleet = fleet_settings_from(args, namespaces) if args.fleet else None
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    # Servers must not inherit the operator's environment: only their task's secrets.
    engine = Engine(engine_settings_from(args, inherit_env=False, cells_outlive_operator=args.cells_outlive_operator))
    api_client = kubernetes.client.ApiClient()
    watched = [] if clusterwide else namespaces
    interval = 0.0 if args.progress_interval.strip() in ("0", "0s") else parse_duration(args.progress_interval)
    pull_requests = PullRequestSettings(default_token_secret=args.forge_token_secret,
                                        default_token_hosts=tuple(args.forge_host),
                                        check_interval=parse_duration(args.pr_check_interval))
    supervisor = Supervisor(engine, api_client, fleet=fleet, namespaces=watched, progress_interval=interval,
                            allow_file_urls=args.allow_file_urls, pull_requests=pull_requests,
                            rebase_rounds=args.rebase_rounds)
    # MergeQueues: driven here while this replica holds each queue's Lease; results reach them
    # from the supervisor's post-push point (spec.integrate: queue).
    from reactor.kube.mergequeues import MergeQueues
    from reactor.mergequeue import ConfinedTests

    merge_queues = MergeQueues(api_client, ConfinedTests(engine.confinement, engine.work_dir, engine.owner),
                               supervisor.mirrors, identity=fleet.replica if fleet is not None else None,
                               lease_duration=fleet.lease_duration if fleet is not None else 15.0,
                               metrics=supervisor.observatory.metrics, forge_for=supervisor.pull_requests.forge_for,
                               views=supervisor.observatory.queues,
                               operator_secrets=(args.forge_token_secret,) if args.forge_token_secret else ())
    supervisor.merge_queues = merge_queues
    web = None
    if args.web != "none":
        web = WebServer(supervisor.observatory, *parse_address(args.web))
    kopf.run(
        registry=fleet_registry if fleet is not None else registry,
        memo=kopf.Memo(supervisor=supervisor, web=web, merge_queues=merge_queues),
        # No kopf peering: one replica (Deployment strategy Recreate), or a fleet whose
        # replicas share the tasks through Leases and claims of their own.
        standalone=True,
        clusterwide=clusterwide,
        namespaces=namespaces,
        liveness_endpoint=None if args.liveness == "none" else args.liveness,
    )
    return 0
