"""Shared fixtures for integration tests (each import line brings one module's fixtures)."""

from tests.integration.apiserver_fixtures import apiserver, apiserver_factory  # noqa: F401
from tests.integration.cluster_fixtures import cluster, cluster_factory  # noqa: F401
from tests.integration.lab_fixtures import lab  # noqa: F401
from tests.integration.store_fixtures import etcd_server, store_backend  # noqa: F401
