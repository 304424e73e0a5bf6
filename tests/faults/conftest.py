"""The integration fixtures (the stand-in's git repository, real nodes) for the fault tests."""

from tests.integration.conftest import make_node, standin_repo, workspace

__all__ = ["make_node", "standin_repo", "workspace"]
