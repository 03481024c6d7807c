"""Kubernetes adapter: Kopf handlers translating AgentTask resources to engine calls."""
