"""Reactor: isolated OpenCode agent cells with Test-Commit-Revert, on Kubernetes or the command line."""

__version__ = "0.1.0"

# The opencode-ai npm version this code is built and tested against.
OPENCODE_VERSION = "1.18.33"
