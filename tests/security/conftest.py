"""The security tests boot real nodes with the integration tests' fixtures."""

from tests.integration.conftest import make_node, standin_repo  # noqa: F401
