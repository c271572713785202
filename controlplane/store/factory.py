"""Build the configured backend: `kpx apiserver --storage sqlite|etcd`."""

from __future__ import annotations

from typing import Any

from controlplane.store.base import Store


def open_store(
    storage: str = "sqlite",
    *,
    sqlite_path: str = "/var/lib/kpx/apiserver.db",
    etcd_endpoints: str = "http://127.0.0.1:2379",
    **options: Any,
) -> Store:
    """A not-yet-started store (call `await store.start()`). options: auto_compact, compact_period,
    retain_revisions, retain_seconds (both backends); synchronous, max_batch (sqlite)."""
    if storage == "sqlite":
        from controlplane.store.sqlite import SQLiteStore

        return SQLiteStore(sqlite_path, **options)
    if storage == "etcd":
        from controlplane.store.etcd import EtcdStore

        return EtcdStore(etcd_endpoints, **options)
    raise ValueError(f"unknown storage {storage!r} (use sqlite or etcd)")
