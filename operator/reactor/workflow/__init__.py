"""The Test-Commit-Revert workflow over one cell. Knows nothing of Kubernetes."""
