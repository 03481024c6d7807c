"""A real Gitea for the session (reactor.testing.forge_fixtures)."""

from reactor.testing.forge_fixtures import gitea  # noqa: F401  (the fixture)
