"""Error types shared across layers. Each carries a message a user can act on."""


class ReactorError(Exception):
    """Base class for errors Reactor reports to its user."""


class ConfigurationError(ReactorError):
    """Bad input: a flag, a spec field, a repository that cannot be used."""
