"""pytest fixtures for a real Gitea (reactor_dev.testing.forge): import them in a conftest.py.

  ``gitea`` (session) a started GiteaServer, stopped after the session; a missing binary is
            built (hack/forge/build.sh), and a failed build FAILS the tests, never skips them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from reactor_dev.testing.forge import ForgeNotBuilt, GiteaServer


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests using the ``gitea`` fixture get the ``forge`` mark (`make test-fast` leaves them out)."""
    for item in items:
        if "gitea" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.forge)


@pytest.fixture(scope="session")
def gitea(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GiteaServer]:
    try:
        server = GiteaServer(tmp_path_factory.mktemp("gitea"))
    except ForgeNotBuilt as exc:
        pytest.fail(str(exc), pytrace=False)
    server.start()
    print(f"\ngitea: started in {server.start_seconds:.2f}s, rss {server.rss_bytes() / 2**20:.0f} MiB")
    try:
        yield server
    finally:
        server.stop()
