"""Test helpers shipped with the package (like kopf.testing): the scripted model, control plane fixtures."""
