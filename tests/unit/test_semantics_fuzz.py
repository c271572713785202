"""Junk in, no traceback out: every object-semantics entry point either succeeds or reports a
user error (PatchError / field errors / AllocationFailed), whatever JSON a client sends."""

import copy
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.alloc import (
    AllocationFailed,
    ClusterIPAllocator,
    NodePortAllocator,
    allocate_service,
    prepare_service_update,
)
from controlplane.defaults import apply_defaults
from controlplane.fieldvalidation import check, type_errors
from controlplane.patch import PatchError, json_patch, merge_patch, server_side_apply, strategic_merge_patch
from controlplane.ssa import record_update
from controlplane.validation import validate_create, validate_update

pytestmark = pytest.mark.unit

KINDS = ["Service", "Pod", "EndpointSlice", "Node", "Namespace"]
KEYS = ["spec", "status", "metadata", "ports", "port", "name", "type", "clusterIP", "clusterIPs", "containers", "image",
        "labels", "selector", "endpoints", "addresses", "addressType", "conditions", "nodePort", "protocol",
        "$patch", "$retainKeys", "$setElementOrder/ports", "$deleteFromPrimitiveList/finalizers", "finalizers",
        "targetPort", "externalTrafficPolicy", "sessionAffinity", "env", "volumes", "ipFamilies", "healthCheckNodePort"]
scalars = st.none() | st.booleans() | st.integers(-2, 70000) | st.sampled_from(
    ["", "None", "TCP", "NodePort", "LoadBalancer", "ExternalName", "10.96.0.10", "x", "replace", "delete", "merge", "a/b"])
junk = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(KEYS), c, max_size=4),
                    max_leaves=14)
objs = st.dictionaries(st.sampled_from(KEYS), junk, max_size=5)

SETTINGS = settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", "80")), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def named(o, kind):
    o = copy.deepcopy(o) if isinstance(o, dict) else {}
    o["kind"] = kind
    o["apiVersion"] = "v1"
    meta = o.get("metadata") if isinstance(o.get("metadata"), dict) else {}
    o["metadata"] = {**meta, "name": "x"}
    return o


@SETTINGS
@given(st.sampled_from(KINDS), objs, objs)
def test_defaults_validation_fieldvalidation_never_crash(kind, a, b):
    for create in (True, False):
        x = named(a, kind)
        check(kind, x)
        type_errors(kind, x)
        apply_defaults(kind, x, create=create)
        validate_create(kind, x)
        validate_update(kind, x, named(b, kind))
        validate_update(kind, x, named(b, kind), subresource="status")


@SETTINGS
@given(st.sampled_from(KINDS), objs, junk)
def test_patches_never_crash(kind, cur, patch):
    cur = named(cur, kind)
    for fn in (merge_patch, json_patch):
        try:
            fn(cur, patch)
        except PatchError:
            pass
    try:
        strategic_merge_patch(cur, patch, kind)
    except PatchError:
        pass


@SETTINGS
@given(st.sampled_from(KINDS), objs, objs, st.booleans())
def test_apply_and_managed_fields_never_crash(kind, live, cfg, force):
    live = named(live, kind)
    cfg = named(cfg, kind)
    try:
        out = server_side_apply(live, cfg, kind, manager="m", force=force)
        server_side_apply(out, named(cfg, kind), kind, manager="n", force=force)
    except PatchError:
        pass
    try:
        server_side_apply(None, cfg, kind, manager="m")
    except PatchError:
        pass
    new = named(cfg, kind)
    record_update(None, new, "a")
    record_update(new, named(live, kind), "b")


@SETTINGS
@given(objs, objs)
def test_service_allocation_never_crashes_and_never_leaks(old_spec, new_spec):
    ips, ports = ClusterIPAllocator("10.96.0.0/24", rng=random.Random(1)), NodePortAllocator(rng=random.Random(2))
    old = named({"spec": old_spec.get("spec") if isinstance(old_spec.get("spec"), dict) else old_spec}, "Service")
    new = named({"spec": new_spec.get("spec") if isinstance(new_spec.get("spec"), dict) else new_spec}, "Service")
    for o in (old, new):
        apply_defaults("Service", o)
    try:
        allocate_service(None, old, ips, ports).commit()
    except AllocationFailed:
        assert ips.used == 0 and ports.used == 0
        return
    held = (ips.used, ports.used)
    prepare_service_update(old, new)
    apply_defaults("Service", new, create=False)
    try:
        txn = allocate_service(old, new, ips, ports)
    except AllocationFailed:
        assert (ips.used, ports.used) == held  # a failed update takes nothing
        return
    txn.revert()
    assert (ips.used, ports.used) == held
