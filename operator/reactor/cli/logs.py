"""`reactor logs TASK [-n NS] [-f]`: an AgentTask's agent transcript.

Needs only a kubeconfig: the transcript comes from the operator through the API server's
service proxy (``services/NAME:PORT/proxy``; RBAC ``get`` on ``services/proxy`` in the
operator's namespace). ``--operator-url`` reads from the operator directly instead (a
port-forward, or `reactor run --web`).
"""

from __future__ import annotations

import argparse
import codecs
import sys
from collections.abc import Iterator
from urllib.parse import quote

DEFAULT_SERVICE = "reactor-system/reactor:web"


def add_subparser(sub) -> None:
    parser = sub.add_parser("logs", help="show an AgentTask's agent transcript (live with -f)")
    parser.add_argument("task", help="AgentTask name")
    parser.add_argument("-n", "--namespace", default=None, help="its namespace (default: the kubeconfig's)")
    parser.add_argument("-f", "--follow", action="store_true", help="keep streaming while the task runs")
    parser.add_argument("--operator-service", default=DEFAULT_SERVICE, metavar="NS/NAME:PORT",
                        help=f"the operator's Service, reached through the API server (default: {DEFAULT_SERVICE})")
    parser.add_argument("--operator-url", default=None, help="read from the operator at this URL instead")
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    parser.set_defaults(func=cmd_logs)


def cmd_logs(args: argparse.Namespace) -> int:
    from reactor.errors import ConfigurationError, ReactorError

    namespace = args.namespace
    try:
        if args.operator_url:
            namespace = namespace or "default"
            chunks = _direct(args.operator_url, namespace, args.task, args.follow)
        else:
            chunks = _through_api_server(args, args.task)
        for chunk in chunks:
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    except (ConfigurationError, ReactorError):
        raise
    return 0


def _query(follow: bool) -> str:
    return "format=text" + ("&follow=1" if follow else "")


def _transcript_path(namespace: str, task: str) -> str:
    return f"/api/v1/tasks/{quote(namespace, safe='')}/{quote(task, safe='')}/transcript"


def _direct(url: str, namespace: str, task: str, follow: bool) -> Iterator[str]:
    import httpx

    from reactor.errors import ReactorError

    target = url.rstrip("/") + _transcript_path(namespace, task) + "?" + _query(follow)
    try:
        with httpx.stream("GET", target, timeout=httpx.Timeout(10.0, read=None)) as response:
            if response.status_code == 404:
                raise ReactorError(f"no task {namespace}/{task} known to the operator at {url}")
            if response.status_code >= 400:
                raise ReactorError(f"operator at {url}: HTTP {response.status_code}")
            yield from response.iter_text()
    except httpx.HTTPError as exc:
        raise ReactorError(f"cannot reach the operator at {url}: {exc}") from None


def _through_api_server(args: argparse.Namespace, task: str) -> Iterator[str]:
    import kubernetes
    from kubernetes.client.rest import ApiException

    from reactor.errors import ConfigurationError, ReactorError

    service_ns, _, rest = args.operator_service.partition("/")
    name, _, port = rest.partition(":")
    if not service_ns or not name:
        raise ConfigurationError(f"--operator-service {args.operator_service!r} must be NAMESPACE/NAME[:PORT]")
    try:
        kubernetes.config.load_kube_config(config_file=args.kubeconfig)
        _, context = kubernetes.config.list_kube_config_contexts(config_file=args.kubeconfig)
    except (kubernetes.config.ConfigException, OSError) as exc:
        raise ConfigurationError(f"no usable kubeconfig: {exc}") from None
    namespace = args.namespace or (context.get("context") or {}).get("namespace") or "default"
    api = kubernetes.client.ApiClient()
    service = f"{name}:{port}" if port else name
    path = (f"/api/v1/namespaces/{service_ns}/services/{service}/proxy"
            f"{_transcript_path(namespace, task)}")
    query = [("format", "text")] + ([("follow", "1")] if args.follow else [])
    method, url, headers, body, post = api.param_serialize(
        method="GET", resource_path=path, query_params=query, header_params={"Accept": "text/plain"},
        auth_settings=["BearerToken"])
    try:
        response = api.call_api(method, url, header_params=headers, body=body, post_params=post,
                                _request_timeout=(10, None)).response  # urllib3, not preloaded: streams
    except ApiException as exc:
        raise ReactorError(f"cannot reach the API server: {exc.reason}") from None
    try:
        if response.status >= 400:
            detail = response.read(2000).decode("utf-8", errors="replace").strip()
            if response.status == 404 and ("no task" in detail or "no transcript" in detail):
                raise ReactorError(f"no task {namespace}/{task} known to the operator")
            if response.status == 403:
                raise ReactorError(f"not allowed to reach the operator through the API server: {detail}; "
                                   f"needs `get` on services/proxy in namespace {service_ns}")
            raise ReactorError(f"cannot reach the operator's service {args.operator_service} through the API server: "
                               f"HTTP {response.status}: {detail[:300]}")
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span chunks
        for chunk in response.stream(4096, decode_content=True):
            yield decoder.decode(chunk)
        yield decoder.decode(b"", final=True)
    finally:
        response.release_conn()
