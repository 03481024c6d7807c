"""Infrastructure: ports, git worktrees, opencode server processes. No HTTP, no Kubernetes."""
