"""Which repository URLs the operator fetches (infra/repository_urls.py): no credentials in a
URL, file:// only under the allowed prefixes and never into the work dir, judged after links."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reactor.infra.repository_urls import RepositoryPolicy, RepositoryRefused
from reactor_dev.testing.repos import git, make_repo


@pytest.fixture
def places(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(allowed prefix holding a repository, the work dir *inside* it, a directory outside it)."""
    allowed, outside = tmp_path / "repos", tmp_path / "elsewhere"
    make_repo(allowed / "app")
    work = allowed / "work"  # under the allowed prefix: must stay refused all the same
    mirror = work / "mirrors" / "other-tenant" / "app-123.git"
    mirror.mkdir(parents=True)
    outside.mkdir()
    return allowed, work, outside


def refused(policy: RepositoryPolicy, url: str) -> str:
    with pytest.raises(RepositoryRefused) as caught:
        policy.clone_url(url)
    return str(caught.value)


@pytest.mark.parametrize("url", ["https://user:s3cr3t-token@example.com/app.git", "https://s3cr3t-token@example.com/a.git",
                                 "ssh://git:s3cr3t-token@example.com/app.git", "ssh://git@host:s3cr3t-token@x/a.git",
                                 "file://s3cr3t-token@/srv/app.git"])
def test_credentials_in_a_url_are_refused_without_repeating_them(url, tmp_path):
    message = refused(RepositoryPolicy(tmp_path / "work", (tmp_path,)), url)
    assert "spec.repository.credentialsSecretRef" in message and "s3cr3t-token" not in message


def test_remote_urls_without_credentials_pass_unchanged(tmp_path):
    policy = RepositoryPolicy(tmp_path / "work")
    for url in ("https://example.com/app.git", "ssh://git@example.com:2222/team/app.git", "ssh://example.com/app"):
        assert policy.clone_url(url) == url
    assert "only https://, ssh:// and file://" in refused(policy, "ext::sh -c touch% /tmp/pwned")
    assert "only https://, ssh:// and file://" in refused(policy, "/srv/repos/app")  # a plain path


def test_file_urls_are_refused_unless_allowed(places):
    allowed, work, _ = places
    message = refused(RepositoryPolicy(work), f"file://{allowed}/app")
    assert "--allow-file-urls PREFIX" in message
    assert RepositoryPolicy(work, (allowed,)).clone_url(f"file://{allowed}/app") == f"file://{allowed.resolve()}/app"
    exactly = RepositoryPolicy(work, (allowed / "app",))  # one repository allowed, as the demo does
    assert exactly.clone_url(f"file://{allowed}/app") == f"file://{allowed.resolve()}/app"


def test_a_file_url_outside_the_allowed_prefixes_is_refused(places):
    allowed, work, outside = places
    policy = RepositoryPolicy(work, (allowed,))
    make_repo(outside / "app")
    assert "outside the paths this operator allows" in refused(policy, f"file://{outside}/app")
    assert "outside the paths" in refused(policy, f"file://{allowed}/../elsewhere/app")  # `..` is resolved first
    (allowed / "escape").symlink_to(outside / "app")
    assert "outside the paths" in refused(policy, f"file://{allowed}/escape")


def test_another_tenants_mirror_in_the_work_dir_is_refused_however_it_is_named(places):
    allowed, work, _ = places
    policy = RepositoryPolicy(work, (allowed,))
    mirror = work / "mirrors" / "other-tenant" / "app-123.git"
    assert "operator's work dir" in refused(policy, f"file://{mirror}")
    assert "operator's work dir" in refused(policy, f"file://{allowed}/app/../work/mirrors/other-tenant/app-123.git")
    assert "operator's work dir" in refused(policy, "file://" + str(mirror).replace("mirrors", "%6Dirrors"))
    (allowed / "shared.git").symlink_to(mirror)  # a link under the allowed prefix
    assert "operator's work dir" in refused(policy, f"file://{allowed}/shared.git")
    assert "operator's work dir" in refused(policy, f"file://{allowed}/shared")  # git would open shared.git
    gitfile = allowed / "gitfile"  # a `.git` file naming the mirror as its git dir
    gitfile.mkdir()
    (gitfile / ".git").write_text(f"gitdir: {mirror}\n")
    assert "operator's work dir" in refused(policy, f"file://{gitfile}")
    borrower = allowed / "borrower.git"  # a repository borrowing the mirror's objects
    git(allowed, "init", "--quiet", "--bare", str(borrower))
    (borrower / "objects" / "info" / "alternates").write_text(f"{mirror}/objects\n")
    assert "operator's work dir" in refused(policy, f"file://{borrower}")
    facade = allowed / "facade.git"  # a bare repository whose objects and refs are the mirror's
    git(allowed, "init", "--quiet", "--bare", str(facade))
    for part in ("objects", "refs"):
        shutil.rmtree(facade / part)
        (facade / part).symlink_to(mirror / part)
    assert "operator's work dir" in refused(policy, f"file://{facade}")


def test_git_is_given_the_resolved_path(places):
    allowed, work, _ = places
    (allowed / "app" / "docs").symlink_to("/usr/share/doc")  # the repository's content may link anywhere
    (allowed / "alias").symlink_to(allowed / "app")
    url = RepositoryPolicy(work, (allowed,)).clone_url(f"file://{allowed}/alias")
    assert url == f"file://{(allowed / 'app').resolve()}"
    assert git(allowed, "ls-remote", url, "refs/heads/main")  # git reads it as the same repository
