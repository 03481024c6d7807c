"""`reactor run --result pr`: a committed task's branch pushed to the repository's remote and
its pull request opened, as the operator does (reactor.forge). The token comes from
$REACTOR_FORGE_TOKEN (never a flag: argv is visible to every process of the machine; and no
REACTOR_* variable is passed to a cell); the push is the user's own `git push`, with the
user's own credentials."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

from reactor.errors import ConfigurationError, ReactorError
from reactor.forge import (
    Attempt,
    ForgeError,
    ForgeRepository,
    Published,
    PullRequestFacts,
    forge_repository,
    open_forge,
    publish_pull_request,
)
from reactor.workflow.types import TaskResult, TaskSpec

TOKEN_ENV = "REACTOR_FORGE_TOKEN"


def remote_forge(repo: Path, remote: str, kind: str | None) -> tuple[ForgeRepository, str]:
    """The forge behind ``remote`` of ``repo`` and the token; checked before any task runs."""
    out = subprocess.run(["git", "-C", str(repo), "remote", "get-url", remote], capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigurationError(f"--result pr: {repo} has no remote {remote!r} (--remote)")
    repository = forge_repository(out.stdout.strip(), kind)
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ConfigurationError(f"--result pr: set ${TOKEN_ENV} to an API token of {repository.api_url}")
    return repository, token


def facts_for(spec: TaskSpec, result: TaskResult) -> PullRequestFacts:
    usage = result.usage
    return PullRequestFacts(
        task=spec.task_id, title=spec.commit_message, commit=result.commit or "", branch=spec.branch,
        base=spec.base_branch, prompt=spec.prompt, description=spec.description,
        test_command=result.test_command or "", test_exit_code=result.test_exit_code,
        test_output_tail=result.test_output_tail, files_changed=result.files_changed,
        attempts=[Attempt(a.number, a.outcome, a.note) for a in result.attempts],
        input_tokens=usage.input_tokens, output_tokens=usage.output_tokens, total_tokens=usage.total_tokens,
        cost=usage.cost, model=result.model or "", confined=result.confined)


def open_pull_request(spec: TaskSpec, result: TaskResult, remote: str, repository: ForgeRepository, token: str,
                      draft: bool = False) -> Published:
    """Push the result branch (never forced) and open (or update) its pull request."""
    push = subprocess.run(["git", "-C", str(spec.repo), "push", "--quiet", remote,
                           f"refs/heads/{spec.branch}:refs/heads/{spec.branch}"], capture_output=True, text=True)
    if push.returncode != 0:
        raise ReactorError(f"{spec.task_id}: git push {remote} {spec.branch} failed: {push.stderr.strip()[-500:]}")

    async def publish() -> Published:
        forge = open_forge(repository, token)
        try:
            return await publish_pull_request(forge, facts_for(spec, result), draft)
        finally:
            await forge.aclose()

    try:
        return asyncio.run(publish())
    except ForgeError as exc:
        raise ReactorError(f"{spec.task_id}: pushed {spec.branch}, but the pull request failed: {exc}") from None
