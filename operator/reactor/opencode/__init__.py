"""Typed async client for the OpenCode server HTTP API."""
