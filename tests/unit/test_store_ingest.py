"""Watch-cache ingest: resourceVersion injected from mod_revision, bytes and dict agree."""

from __future__ import annotations

import orjson
import pytest

from controlplane.store.base import KV
from controlplane.store.cache import ingest

pytestmark = pytest.mark.unit


def test_resource_version_is_injected_from_mod_revision() -> None:
    stored = orjson.dumps({"kind": "Service", "metadata": {"name": "a", "namespace": "default"}})
    co = ingest(KV("/registry/services/default/a", stored, 42, 7))
    assert co.rev == 42 and co.create_revision == 7
    assert co.obj["metadata"] == {"name": "a", "namespace": "default", "resourceVersion": "42"}
    assert orjson.loads(co.raw) == co.obj
    assert len(co.raw) == len(orjson.dumps(co.obj))


def test_a_stored_resource_version_is_overridden_and_metadata_created() -> None:
    co = ingest(KV("/k", b'{"metadata":{"resourceVersion":"1"}}', 9, 9))
    assert co.obj["metadata"]["resourceVersion"] == "9"
    co = ingest(KV("/k", b'{"kind":"X"}', 3, 3))
    assert co.obj == {"kind": "X", "metadata": {"resourceVersion": "3"}}


def test_a_value_that_is_not_a_json_object_is_kept_verbatim() -> None:
    for raw in (b"not json", b"[1,2]", b""):
        co = ingest(KV("/k", raw, 5, 5))
        assert co.raw == raw and co.obj == {}


@pytest.mark.parametrize(
    "stored",
    [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {}},
        # metadata after a nested object: the bytes are re-encoded, never spliced into the wrong place
        {"spec": {"template": {"metadata": {"name": "inner"}}}, "metadata": {"name": "outer"}},
        {"kind": "X", "note": 'a "metadata":{ in a string', "metadata": {"name": "n"}},
    ],
)
def test_raw_bytes_always_decode_to_the_injected_object(stored: dict[str, object]) -> None:
    co = ingest(KV("/k", orjson.dumps(stored), 77, 70))
    assert orjson.loads(co.raw) == co.obj
    assert co.obj["metadata"]["resourceVersion"] == "77"
    assert co.obj.get("spec") == stored.get("spec")
