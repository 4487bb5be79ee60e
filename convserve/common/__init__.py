"""convserve.common: what client/, server/ and models/ share without importing one another.

``commands`` holds the CLI plumbing (CommandError, the missing-extra message); ``model_config`` the
model-config contract that the exporter writes and the server reads. Standard library only, so the
light base install imports it.
"""
