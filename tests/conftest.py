"""Shared pytest plugins. Importing this needs no cluster, no torch and no running server."""

pytest_plugins = ["tests.support.s3"]
