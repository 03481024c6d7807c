"""A real Gitea for the session (reactor_dev.testing.forge_fixtures)."""

from reactor_dev.testing.forge_fixtures import gitea  # noqa: F401  (the fixture)
