"""Test helpers shipped with the package (like kopf.testing): the scripted model, control plane
fixtures, a `reactor operator` process runner, small git repositories and polling helpers
(`helpers.py`: free_port, wait_for, until): one home each, for tests, benchmarks and the demo."""
