"""A real Gitea for the session (reactor_dev.testing.forge_fixtures); its tests get the mark `forge`."""

from reactor_dev.testing.forge_fixtures import gitea, pytest_collection_modifyitems  # noqa: F401
