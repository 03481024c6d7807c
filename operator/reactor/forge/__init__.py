"""Pull requests on a forge (Gitea/Forgejo, GitHub): the adapter interface, two adapters, the
body the operator writes, and the idempotent publish. No Kubernetes here (kube/pullrequests.py
is the glue) and nothing the workflow needs."""

from reactor.forge.body import Attempt, PullRequestFacts, render_body
from reactor.forge.publish import Action, Published, publish_pull_request
from reactor.forge.select import ForgeRepository, forge_repository, open_forge
from reactor.forge.types import (
    STATUS_CONTEXT,
    AlreadyExists,
    Forge,
    ForgeError,
    ForgeKind,
    ForgeRefused,
    ForgeUnavailable,
    HeadOutOfDate,
    NotMergeable,
    PRState,
    PullRequest,
)

__all__ = [
    "Action", "AlreadyExists", "Attempt", "Forge", "ForgeError", "ForgeKind", "ForgeRefused", "ForgeRepository",
    "ForgeUnavailable", "HeadOutOfDate", "NotMergeable", "PRState", "PullRequest", "PullRequestFacts", "Published",
    "STATUS_CONTEXT", "forge_repository", "open_forge", "publish_pull_request", "render_body",
]
