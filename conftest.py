"""Root conftest: the shared test plugin is registered here, before any package's conftest
imports from it (so pytest can rewrite its asserts)."""

pytest_plugins = ["shoal_common.testing"]
