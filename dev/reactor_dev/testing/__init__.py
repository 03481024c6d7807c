"""Test helpers (like kopf.testing, but not shipped in the operator image): the scripted model,
control plane fixtures, a `reactor operator` process runner, small git repositories and polling
helpers (`helpers.py`: free_port, wait_for, until): one home each, for tests, benchmarks and the
demo."""
