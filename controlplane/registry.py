"""The read/write path shared by the REST handlers and the in-process controllers.

Writes go straight to the store (compare-and-swap on the key's mod_revision), reads come from the
watch cache. Every write runs the same pipeline whoever calls it:

    decode -> metadata (uid, timestamps, generateName) -> defaulting -> validation -> allocation
           -> store write (CAS) -> commit allocation (or revert on failure)

so a rejected request leaves nothing half-written. Objects are plain dicts; the stored bytes carry
no metadata.resourceVersion (it is the key's mod_revision, injected on read).

Controllers (H3) use:
    reg.get("pods", ns, name) -> dict | None
    reg.list("pods", namespace=None, label_selector="", field_selector="") -> (items, rv)
    reg.watch("pods", namespace=None, resource_version="", ...) -> async iterator of (type, obj)
    reg.create("pods", obj, namespace=None)            # ApiError on failure
    reg.update("pods", obj)                            # CAS on metadata.resourceVersion (409)
    reg.update_status("pods", obj)
    reg.patch("pods", ns, name, patch_type, body)      # patch_type: "merge" | "strategic" | "json" | "apply"
    reg.delete("pods", ns, name, preconditions=None, grace_period_seconds=None)
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import logging
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from controlplane import errors, eventconv, semantics
from controlplane.errors import ApiError
from controlplane.reservations import Reservations, Taken
from controlplane.resources import Resource, by_name
from controlplane.selectors import EVERYTHING, Selector
from controlplane.selectors import parse as parse_selector
from controlplane.store import base

log = logging.getLogger("controlplane.registry")
ObjList = list[dict[str, Any]]  # (the class below has a method named `list`)

_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"
TOO_LARGE_RV_WAIT = 3.0
INITIAL_EVENTS_END = "k8s.io/initial-events-end"

PATCH_TYPES = {
    "application/json-patch+json": "json",
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
    "application/apply-patch+yaml": "apply",
    "application/apply-patch+json": "apply",
}


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def encode_stored(obj: dict[str, Any]) -> bytes:
    """Bytes as stored: the object without metadata.resourceVersion."""
    meta = obj.get("metadata")
    if isinstance(meta, dict) and "resourceVersion" in meta:
        rv = meta.pop("resourceVersion")
        try:
            return orjson.dumps(obj)
        finally:
            meta["resourceVersion"] = rv
    return orjson.dumps(obj)


def with_rv(obj: dict[str, Any], rev: int) -> dict[str, Any]:
    obj.setdefault("metadata", {})["resourceVersion"] = str(rev)
    return obj


@dataclass
class WriteOptions:
    dry_run: bool = False
    field_manager: str = "kube-controller-manager"  # in-process writers are the controllers
    field_validation: str = "Ignore"  # Strict | Warn | Ignore (unknown fields, checked by the REST layer)
    force: bool = False
    warnings: list[str] = field(default_factory=list)


@dataclass
class RegistryConfig:
    service_cluster_ip_range: str = "10.96.0.0/12"
    service_node_port_range: str = "30000-32767"
    bookmark_interval: float = 60.0
    shared_store: bool = False  # etcd: other apiservers may allocate too -> reserve values in the store


@dataclass
class ListResult:
    raw_items: list[bytes]
    objs: list[dict[str, Any]]
    rv: int
    continue_token: str = ""
    remaining: int | None = None


def _res(resource: Resource | str) -> Resource:
    return resource if isinstance(resource, Resource) else by_name(resource)


def _parse_rv(rv: str, what: str = "resourceVersion") -> int:
    try:
        n = int(rv)
    except ValueError:
        raise errors.bad_request(f"invalid {what}: {rv!r}: must be a non-negative integer") from None
    if n < 0:
        raise errors.bad_request(f"invalid {what}: {rv!r}: must be a non-negative integer")
    return n


class Registry:
    def __init__(self, store: base.Store, cache: Any, config: RegistryConfig | None = None) -> None:
        self.store = store
        self.cache = cache
        self.config = config or RegistryConfig()
        self.sem = semantics.Semantics(self.config.service_cluster_ip_range, self.config.service_node_port_range)
        self._write_lock = asyncio.Lock()  # serialises allocation + write per process
        self.reservations: Reservations | None = (
            Reservations(store, self._holds) if self.config.shared_store else None
        )

    async def start(self) -> None:
        prefix = by_name("services").prefix(None)
        items, rev, _ = self.cache.list(prefix)
        for w in self.sem.rebuild_allocations([c.obj for c in items]):
            log.warning("%s", w)
        if self.reservations is not None:
            held: list[tuple[str, str, str | int]] = []
            for c in items:
                ips, ports = semantics._held(c.obj)
                held += [(c.key, "clusterips", ip) for ip in ips] + [(c.key, "nodeports", p) for p in ports]
            n = await self.reservations.ensure(held)
            if n:
                log.info("reserved %d ClusterIPs/NodePorts held by stored Services", n)
        self._alloc_task = asyncio.get_running_loop().create_task(self._follow_services(prefix, rev),
                                                                  name="kpx-registry-alloc")

    def _holds(self, owner: str, kind: str, value: str | int) -> bool:
        co = self.cache.get(owner)
        if co is None:
            return False
        ips, ports = semantics._held(co.obj)
        return value in (ips if kind == "clusterips" else ports)

    async def _allocate(
        self, res: Resource, old: dict[str, Any] | None, new: dict[str, Any], key: str, dry_run: bool
    ) -> Any:
        """Local allocation, then (shared store) reservation of each newly taken value; a value another
        apiserver holds is marked taken here and the allocation retried (or 422 if the user asked for it)."""
        asked = copy.deepcopy(new.get("spec"))
        for _attempt in range(16):
            txn = self.sem.allocate(res, old, new, dry_run=dry_run)
            if txn is None or dry_run or self.reservations is None:
                return txn
            done: list[tuple[str, str | int]] = []
            try:
                for kind, vals in (("clusterips", txn.allocated_ips), ("nodeports", txn.allocated_ports)):
                    for v in vals:
                        await self.reservations.reserve(key, kind, v)
                        done.append((kind, v))
                return txn
            except Taken as t:
                txn.revert()
                for kind, v in done:
                    await self.reservations.release(key, kind, v)
                self.sem.mark_taken(t.kind, t.value)
                spec_s = orjson.dumps(asked or {}).decode()
                user_asked = (f'"{t.value}"' in spec_s) if t.kind == "clusterips" else (
                    f'"nodePort":{t.value}' in spec_s or f'"healthCheckNodePort":{t.value}' in spec_s)
                if user_asked:
                    field = "spec.clusterIPs" if t.kind == "clusterips" else "spec.ports"
                    what = "provided IP is already allocated" if t.kind == "clusterips" else \
                        "provided port is already allocated"
                    raise errors.invalid("Service", new["metadata"].get("name", ""), [errors.cause(
                        field, f"Invalid value: {orjson.dumps(t.value).decode()}: {what}")]) from None
                new["spec"] = copy.deepcopy(asked)
        raise errors.internal("could not reserve a ClusterIP/NodePort: too many collisions with other apiservers")

    async def _unreserve(self, key: str, ips: Any, ports: Any) -> None:
        if self.reservations is None:
            return
        for kind, vals in (("clusterips", ips), ("nodeports", ports)):
            for v in vals:
                try:
                    await self.reservations.release(key, kind, v)
                except base.StoreError as e:  # a leftover is taken over once stale
                    log.warning("releasing %s %s: %s", kind, v, e)

    async def stop(self) -> None:
        t = getattr(self, "_alloc_task", None)
        if t is not None:
            t.cancel()
            with contextlib.suppress(BaseException):
                await t

    async def _follow_services(self, prefix: str, rev: int) -> None:
        """Keep ClusterIP/NodePort allocations in step with Services other apiservers on the same store
        write (and with our own writes, idempotently)."""
        while True:
            try:
                w = self.cache.watch(prefix, rev)
                async for ev in w:
                    rev = ev.rev
                    self.sem.observe_service(ev.type, ev.key, ev.obj.obj if ev.type == "PUT" else None,
                                             ev.prev.obj if ev.prev is not None else ev.obj.obj)
            except asyncio.CancelledError:
                raise
            except base.Compacted:
                items, rev, _ = self.cache.list(prefix)
                for c in items:
                    self.sem.observe_service("PUT", c.key, c.obj, None)
            except Exception:
                log.exception("allocation follower failed; restarting")
            await asyncio.sleep(0.1)

    # ------------------------------------------------------------------ reads

    async def _cache_get(self, key: str) -> Any:
        return self.cache.get(key)

    async def _fresh(self, resource_version: str) -> int:
        """Make the cache at least as fresh as the request asks; returns the revision it is at."""
        if resource_version == "0":
            return 0
        if resource_version == "":
            try:
                return int(await self.cache.consistent_revision(TOO_LARGE_RV_WAIT))
            except base.FutureRevision:
                raise errors.timeout("Timeout: the watch cache did not catch up with the store in time") from None
        want = _parse_rv(resource_version)
        await self._wait_for(want)
        return want

    async def _wait_for(self, rev: int) -> None:
        try:
            await self.cache.wait_for_revision(rev, TOO_LARGE_RV_WAIT)
        except base.FutureRevision:
            cur = await self.store.current_revision()
            if rev > cur:
                raise errors.too_large_resource_version(rev, cur) from None

    async def get_cached(self, res: Resource, namespace: str, name: str, resource_version: str = "") -> Any:
        """CachedObject (key, rev, obj, raw) or ApiError 404."""
        await self._fresh(resource_version)
        co = await self._cache_get(res.key(namespace, name))
        if co is None:
            raise errors.not_found(res.resource, name, res.group)
        return co

    async def get(
        self, resource: Resource | str, namespace: str | None, name: str, resource_version: str = ""
    ) -> dict[str, Any] | None:
        res = _res(resource)
        try:
            co = await self.get_cached(res, namespace or "", name, resource_version)
        except ApiError as e:
            if e.code == 404:
                return None
            raise
        return self.present(res, co.obj)

    def present(self, res: Resource, obj: dict[str, Any], *, private: bool = False) -> dict[str, Any]:
        """The object as `res` shows it: a deep copy (callers may mutate it) unless `obj` is already
        private to this request (write results are built per request, never shared with the cache)."""
        if not private:
            obj = copy.deepcopy(obj)
        if res.group == "events.k8s.io":
            return eventconv.to_events_v1(obj)
        return obj

    def present_raw(self, res: Resource, co: Any) -> bytes:
        if res.group == "events.k8s.io":
            return orjson.dumps(eventconv.to_events_v1(co.obj))
        return co.raw

    async def list_page(
        self,
        res: Resource,
        namespace: str | None,
        selector: Selector = EVERYTHING,
        *,
        limit: int = 0,
        continue_token: str = "",
        resource_version: str = "",
        resource_version_match: str = "",
    ) -> ListResult:
        from controlplane import paging

        start_after = ""
        exact: int | None = None
        if continue_token:
            if resource_version not in ("", "0") or resource_version_match:
                raise errors.invalid_list_options(
                    "resourceVersion", "specifying resource version is not allowed when using continue"
                )
            tok = paging.decode(continue_token)
            exact, start_after = tok.rv, tok.start_after
        elif resource_version_match == "Exact" or (limit and resource_version not in ("", "0")
                                                   and not resource_version_match):
            exact = _parse_rv(resource_version)
        elif resource_version_match == "NotOlderThan":
            await self._fresh(resource_version)
        else:
            await self._fresh(resource_version)
        prefix = res.prefix(namespace)
        if exact is not None and exact != 0 and exact != self.cache.revision:
            items, rev = await self._list_at(prefix, exact, start_after)
        else:
            items, rev, _ = self.cache.list(prefix, start_after)
        if not selector.empty:
            items = [c for c in items if selector.matches(c.obj)]
        cont, remaining = "", None
        if limit and len(items) > limit:
            remaining = len(items) - limit
            items = items[:limit]
            cont = paging.encode(rev, items[-1].key)
        return ListResult([self.present_raw(res, c) for c in items], [c.obj for c in items], rev, cont, remaining)

    async def _list_at(self, prefix: str, rev: int, start_after: str = "") -> tuple[list[Any], int]:
        """Exact list at an older revision: served by the store (the cache keeps only the newest state)."""
        cur = await self.store.current_revision()
        if rev > cur:
            await self._wait_for(rev)
        try:
            kvs, at, _ = await self.store.list(prefix, revision=rev, start_after=start_after)
        except base.Compacted as e:
            raise errors.expired_rv(rev, e.compacted) from None
        except base.FutureRevision:
            raise errors.too_large_resource_version(rev, await self.store.current_revision()) from None
        out = []
        for kv in kvs:
            obj = with_rv(orjson.loads(kv.value), kv.mod_revision)
            out.append(_Snap(kv.key, kv.mod_revision, obj, orjson.dumps(obj)))
        return out, at

    async def list(
        self,
        resource: Resource | str,
        namespace: str | None = None,
        label_selector: str = "",
        field_selector: str = "",
        resource_version: str = "",
    ) -> tuple[list[dict[str, Any]], str]:
        res = _res(resource)
        sel = parse_selector(label_selector, field_selector, res.resource)
        page = await self.list_page(res, namespace, sel, resource_version=resource_version)
        return [self.present(res, o) for o in page.objs], str(page.rv)

    def watch(
        self,
        resource: Resource | str,
        namespace: str | None = None,
        resource_version: str = "",
        label_selector: str = "",
        field_selector: str = "",
        *,
        allow_bookmarks: bool = False,
        send_initial_events: bool | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(type, obj) pairs: ADDED/MODIFIED/DELETED/BOOKMARK, or one ERROR (a Status) that ends it."""
        from controlplane.watch import Watch

        res = _res(resource)
        sel = parse_selector(label_selector, field_selector, res.resource)
        w = Watch(self, res, namespace, sel, resource_version, allow_bookmarks, send_initial_events, timeout)
        return w.objects()

    # ------------------------------------------------------------------ writes

    async def _namespace_check(self, res: Resource, namespace: str, name: str) -> None:
        if not res.namespaced:
            return
        key = f"/registry/namespaces/{namespace}"
        co = await self._cache_get(key)
        ns_obj: dict[str, Any] | None = co.obj if co is not None else None
        if ns_obj is None:
            kv = await self.store.get(key)
            ns_obj = orjson.loads(kv.value) if kv else None
        if ns_obj is None:
            raise errors.not_found("namespaces", namespace)
        if (ns_obj.get("status") or {}).get("phase") == "Terminating" or (ns_obj.get("metadata") or {}).get(
            "deletionTimestamp"
        ):
            raise errors.forbidden(
                res.resource,
                name,
                f'{res.qualified} "{name}" is forbidden: unable to create new content in namespace {namespace} '
                "because it is being terminated",
                res.group,
            )

    def _to_storage_shape(self, res: Resource, obj: dict[str, Any]) -> dict[str, Any]:
        if res.group == "events.k8s.io":
            return eventconv.to_core(obj)
        return obj

    def _check_type(self, res: Resource, obj: Any) -> dict[str, Any]:
        if not isinstance(obj, dict):
            raise errors.bad_request(f"the body of the request must be a JSON object, not {type(obj).__name__}")
        kind, av = obj.get("kind"), obj.get("apiVersion")
        if kind in (None, "") or av in (None, ""):
            # a missing type is defaulted from the URL, as kube-apiserver's decoder does
            obj = {**obj, "apiVersion": av or res.api_version, "kind": kind or res.kind}
            kind, av = obj["kind"], obj["apiVersion"]
        if kind != res.kind or av != res.api_version:
            raise errors.bad_request(
                f"the API version in the data ({av}) does not match the expected API version ({res.api_version})"
                if av != res.api_version
                else f"the kind in the data ({kind}) does not match the expected kind ({res.kind})"
            )
        _drop_nulls(obj)  # JSON null decodes to the zero value: the field is absent
        meta = obj.get("metadata")
        if meta is None:
            obj["metadata"] = meta = {}
        if not isinstance(meta, dict):
            raise errors.bad_request("metadata must be an object")
        return obj

    def _resolve_namespace(self, res: Resource, obj: dict[str, Any], namespace: str | None) -> str:
        meta = obj["metadata"]
        body_ns = meta.get("namespace")
        if not res.namespaced:
            if body_ns:
                if namespace is None:
                    meta.pop("namespace", None)
                    return ""
                raise errors.bad_request(f"namespace must not be set for cluster-scoped {res.resource}")
            meta.pop("namespace", None)
            return ""
        ns = namespace if namespace is not None else body_ns
        if not ns:
            ns = "default"
        if body_ns and body_ns != ns:
            raise errors.bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        if not isinstance(ns, str):
            raise errors.bad_request("metadata.namespace must be a string")
        meta["namespace"] = ns
        return ns

    async def create(
        self,
        resource: Resource | str,
        obj: dict[str, Any],
        namespace: str | None = None,
        opts: WriteOptions | None = None,
    ) -> dict[str, Any]:
        res = _res(resource)
        opts = opts or WriteOptions()
        obj = self._check_type(res, obj)
        ns = self._resolve_namespace(res, obj, namespace)
        obj = self._to_storage_shape(res, obj)
        meta = obj["metadata"]
        gen_name = meta.get("generateName")
        name = meta.get("name")
        if not name and not gen_name:
            raise errors.invalid(
                res.kind, "", [errors.cause("metadata.name", "Required value: name or generateName is required",
                                            "FieldValueRequired")], res.group
            )
        if name is not None and not isinstance(name, str):
            raise errors.bad_request("metadata.name must be a string")
        if gen_name is not None and not isinstance(gen_name, str):
            raise errors.bad_request("metadata.generateName must be a string")
        for attempt in range(8):
            o = copy.deepcopy(obj) if gen_name and not name else obj
            m = o["metadata"]
            if not name:
                m["name"] = str(gen_name)[:58] + "".join(random.choice(_NAME_CHARS) for _ in range(5))
            try:
                return await self._create_one(res, o, ns, opts)
            except ApiError as e:
                if e.reason == "AlreadyExists" and not name and attempt < 7:
                    continue
                raise
        raise errors.internal("could not generate a unique name")  # pragma: no cover

    async def _create_one(self, res: Resource, obj: dict[str, Any], ns: str, opts: WriteOptions) -> dict[str, Any]:
        meta = obj["metadata"]
        name = meta["name"]
        for k in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"):
            meta.pop(k, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        if res.kind not in ("Event",):
            meta["generation"] = 1
        self.sem.prepare_create(res, obj)
        self.sem.default(res, obj, create=True)
        self.sem.managed_fields_update(res, None, obj, opts.field_manager, "Update")
        self.sem.validate_create(res, obj)
        await self._namespace_check(res, ns, name)
        async with self._write_lock:
            key = res.key(ns, name)
            txn = await self._allocate(res, None, obj, key, opts.dry_run)
            if opts.dry_run:
                exists = await self.store.get(key)
                if txn:
                    txn.revert()
                if exists is not None:
                    raise errors.already_exists(res.resource, name, res.group)
                return self.present(res, obj)
            try:
                kv = await self.store.create(key, encode_stored(obj))
            except BaseException as e:
                if txn:
                    txn.revert()
                    await self._unreserve(key, txn.allocated_ips, txn.allocated_ports)
                if isinstance(e, base.KeyExists):
                    raise errors.already_exists(res.resource, name, res.group) from None
                raise
            if txn:
                txn.commit()
        return self.present(res, with_rv(obj, kv.mod_revision), private=True)

    async def _current(self, res: Resource, ns: str, name: str) -> tuple[dict[str, Any], base.KV]:
        kv = await self.store.get(res.key(ns, name))
        if kv is None:
            raise errors.not_found(res.resource, name, res.group)
        return with_rv(orjson.loads(kv.value), kv.mod_revision), kv

    async def update(
        self,
        resource: Resource | str,
        obj: dict[str, Any],
        namespace: str | None = None,
        name: str | None = None,
        opts: WriteOptions | None = None,
        subresource: str = "",
    ) -> dict[str, Any]:
        """PUT: replace the object (or only its status with subresource="status"); 409 on a stale RV."""
        res = _res(resource)
        opts = opts or WriteOptions()
        obj = self._check_type(res, obj)
        ns = self._resolve_namespace(res, obj, namespace)
        obj = self._to_storage_shape(res, obj)
        meta = obj["metadata"]
        body_name = meta.get("name")
        if name is None:
            name = body_name
        if not name:
            raise errors.bad_request("name is required for an update")
        if body_name != name:
            raise errors.bad_request(
                f"the name of the object ({body_name}) does not match the name on the URL ({name})"
            )
        want_rv = meta.get("resourceVersion") or ""
        if want_rv:
            if not isinstance(want_rv, str):
                raise errors.bad_request("metadata.resourceVersion must be a string")
            try:
                _parse_rv(want_rv, "metadata.resourceVersion")
            except ApiError:
                raise errors.invalid(
                    res.kind, name,
                    [errors.cause("metadata.resourceVersion", f'Invalid value: "{want_rv}": must be an integer')],
                    res.group,
                ) from None

        def mutate(cur: dict[str, Any]) -> dict[str, Any]:
            new = copy.deepcopy(obj)
            if want_rv and cur["metadata"].get("resourceVersion") != want_rv:
                raise errors.conflict(res.resource, name, res.group)
            return new

        return await self._guaranteed_update(res, ns, name, mutate, opts, subresource, conditional=bool(want_rv))

    async def update_status(
        self, resource: Resource | str, obj: dict[str, Any], opts: WriteOptions | None = None
    ) -> dict[str, Any]:
        return await self.update(resource, obj, opts=opts, subresource="status")

    async def patch(
        self,
        resource: Resource | str,
        namespace: str | None,
        name: str,
        patch_type: str,
        body: Any,
        opts: WriteOptions | None = None,
        subresource: str = "",
    ) -> tuple[dict[str, Any], bool]:
        """Returns (object, created). patch_type: json | merge | strategic | apply (server-side apply)."""
        res = _res(resource)
        opts = opts or WriteOptions()
        ns = (namespace or "default") if res.namespaced else ""
        if patch_type == "apply":
            if not opts.field_manager:
                raise errors.bad_request("PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: "
                                         "is required for apply patch")
            try:
                await self._current(res, ns, name)
            except ApiError as e:
                if e.code != 404:
                    raise
                new = self.sem.apply_create(res, body, opts.field_manager)
                if isinstance(new, dict):
                    new_meta = new.setdefault("metadata", {}) if isinstance(new.get("metadata", {}), dict) else None
                    if new_meta is not None and new_meta.get("name") not in (None, name):
                        raise errors.bad_request(
                            f"the name of the object ({new_meta.get('name')}) does not match the name on the URL "
                            f"({name})") from None
                    if new_meta is not None:
                        new_meta["name"] = name
                try:
                    return await self.create(res, new, ns if res.namespaced else None, opts), True
                except ApiError as ce:
                    if ce.reason != "AlreadyExists":
                        raise
        body_rv = ""
        if isinstance(body, dict) and isinstance(body.get("metadata"), dict):
            body_rv = body["metadata"].get("resourceVersion") or ""

        def mutate(cur: dict[str, Any]) -> dict[str, Any]:
            if body_rv and cur["metadata"].get("resourceVersion") != body_rv:
                raise errors.conflict(res.resource, name, res.group)
            shown = self.present(res, cur)
            new = self.sem.apply_patch(res, shown, patch_type, body, opts, subresource)
            if not isinstance(new, dict) or not isinstance(new.get("metadata"), dict):
                raise errors.bad_request("the patch produced an object without metadata")
            if new["metadata"].get("name") != name:
                raise errors.bad_request(
                    f"the name of the object ({new['metadata'].get('name')}) does not match the name on the URL "
                    f"({name})")
            new = self._check_type(res, new)
            if res.namespaced and new["metadata"].get("namespace", ns) != ns:
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request")
            return self._to_storage_shape(res, new)

        obj = await self._guaranteed_update(res, ns, name, mutate, opts, subresource, conditional=bool(body_rv),
                                            manager_op="Apply" if patch_type == "apply" else "Update")
        return obj, False

    async def _guaranteed_update(
        self,
        res: Resource,
        ns: str,
        name: str,
        mutate: Any,
        opts: WriteOptions,
        subresource: str,
        *,
        conditional: bool,
        manager_op: str = "Update",
    ) -> dict[str, Any]:
        for _attempt in range(16):
            cur, kv = await self._current(res, ns, name)
            new = mutate(cur)
            new_meta = new.setdefault("metadata", {})
            old_meta = cur["metadata"]
            # server-owned metadata is carried over whatever the client sent
            for k in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation"):
                if k in old_meta:
                    new_meta[k] = old_meta[k]
                else:
                    new_meta.pop(k, None)
            new_meta["name"] = name
            if res.namespaced:
                new_meta["namespace"] = ns
            new_meta.pop("resourceVersion", None)
            if subresource == "status":
                merged = copy.deepcopy(cur)
                merged.pop("status", None)
                if "status" in new:
                    merged["status"] = new["status"]
                merged["metadata"]["managedFields"] = new_meta.get("managedFields", old_meta.get("managedFields"))
                if merged["metadata"].get("managedFields") is None:
                    merged["metadata"].pop("managedFields", None)
                new = merged
                new["metadata"].pop("resourceVersion", None)
            elif subresource == "" and res.subresources and "status" in res.subresources and res.kind != "Namespace":
                if "status" in cur:
                    new["status"] = copy.deepcopy(cur["status"])
                else:
                    new.pop("status", None)
            elif subresource == "finalize":
                # only spec.finalizers changes through /finalize
                merged = copy.deepcopy(cur)
                merged.setdefault("spec", {})["finalizers"] = (new.get("spec") or {}).get("finalizers") or []
                if not merged["spec"]["finalizers"]:
                    merged["spec"].pop("finalizers")
                merged["metadata"].pop("resourceVersion", None)
                new = merged
            if res.kind == "Namespace" and subresource == "" and "status" in cur:
                # status (phase) is server-owned for namespaces except via /status
                new["status"] = copy.deepcopy(cur["status"])
            self.sem.prepare_update(res, cur, new)
            self.sem.default(res, new, create=False)
            if subresource == "" and self._spec_changed(cur, new) and "generation" in old_meta:
                new_meta = new["metadata"]
                new_meta["generation"] = int(old_meta.get("generation") or 1) + 1
            self.sem.validate_update(res, new, cur, subresource)
            if old_meta.get("deletionTimestamp"):
                self._check_finalizers_after_delete(res, name, cur, new)
            if _same_ignoring_managed(cur, new):
                return self.present(res, cur)
            self.sem.managed_fields_update(res, cur, new, opts.field_manager, manager_op, subresource)
            key = res.key(ns, name)
            async with self._write_lock:
                txn = await self._allocate(res, cur, new, key, opts.dry_run)
                if opts.dry_run:
                    if txn:
                        txn.revert()
                    return self.present(res, with_rv(new, kv.mod_revision))
                try:
                    if self._should_delete(res, new):
                        dkv = await self.store.delete(key, kv.mod_revision)
                        if txn:
                            txn.commit()
                        self.sem.release(res, new)
                        if res.kind == "Service" and not res.group:
                            await self._unreserve(key, *semantics._held(cur))
                        return self.present(res, with_rv(new, dkv.mod_revision), private=True)
                    nkv = await self.store.update(key, encode_stored(new), kv.mod_revision)
                except BaseException as e:
                    if txn:
                        txn.revert()
                        await self._unreserve(key, txn.allocated_ips, txn.allocated_ports)
                    if isinstance(e, base.Conflict):
                        if conditional:
                            raise errors.conflict(res.resource, name, res.group) from None
                        continue
                    if isinstance(e, base.KeyNotFound):
                        raise errors.not_found(res.resource, name, res.group) from None
                    raise
                if txn:
                    txn.commit()
                    await self._unreserve(key, txn.release_ips, txn.release_ports)
            return self.present(res, with_rv(new, nkv.mod_revision), private=True)
        raise errors.conflict(res.resource, name, res.group, "too many concurrent writers, try again")

    @staticmethod
    def _spec_changed(cur: dict[str, Any], new: dict[str, Any]) -> bool:
        a = {k: v for k, v in cur.items() if k not in ("metadata", "status")}
        b = {k: v for k, v in new.items() if k not in ("metadata", "status")}
        return a != b

    def _check_finalizers_after_delete(
        self, res: Resource, name: str, cur: dict[str, Any], new: dict[str, Any]
    ) -> None:
        old_f = set(cur["metadata"].get("finalizers") or [])
        new_f = set(new["metadata"].get("finalizers") or [])
        added = sorted(new_f - old_f)
        if added:
            raise errors.invalid(
                res.kind, name,
                [errors.cause("metadata.finalizers",
                              f"Forbidden: no new finalizers can be added if the object is being deleted, "
                              f"found new finalizers {added}", "FieldValueForbidden")],
                res.group,
            )

    @staticmethod
    def _should_delete(res: Resource, obj: dict[str, Any]) -> bool:
        meta = obj["metadata"]
        if not meta.get("deletionTimestamp") or meta.get("finalizers"):
            return False
        if res.kind == "Namespace":
            return not (obj.get("spec") or {}).get("finalizers")
        if res.kind == "Pod":
            # graceful pod deletion ends with a delete(grace=0) from the node agent, not with an update
            return meta.get("deletionGracePeriodSeconds", 0) == 0
        return True

    async def delete(
        self,
        resource: Resource | str,
        namespace: str | None,
        name: str,
        preconditions: dict[str, Any] | None = None,
        grace_period_seconds: int | None = None,
        opts: WriteOptions | None = None,
        propagation_policy: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Returns (object, gone-now). With finalizers (or a graceful pod) the object stays, marked deleted."""
        res = _res(resource)
        opts = opts or WriteOptions()
        ns = (namespace or "default") if res.namespaced else ""
        preconditions = preconditions or {}
        for _attempt in range(16):
            cur, kv = await self._current(res, ns, name)
            meta = cur["metadata"]
            if preconditions.get("uid") and preconditions["uid"] != meta.get("uid"):
                raise errors.conflict(
                    res.resource, name, res.group,
                    f"Precondition failed: UID in precondition: {preconditions['uid']}, UID in object meta: "
                    f"{meta.get('uid')}")
            if preconditions.get("resourceVersion") and preconditions["resourceVersion"] != meta.get(
                "resourceVersion"
            ):
                raise errors.conflict(
                    res.resource, name, res.group,
                    f"Precondition failed: ResourceVersion in precondition: {preconditions['resourceVersion']}, "
                    f"ResourceVersion in object meta: {meta.get('resourceVersion')}")
            new = copy.deepcopy(cur)
            nmeta = new["metadata"]
            nmeta.pop("resourceVersion", None)
            graceful = self._graceful(res, new, grace_period_seconds)
            finalizers = list(nmeta.get("finalizers") or [])
            if propagation_policy == "Orphan" and "orphan" not in finalizers and not nmeta.get("deletionTimestamp"):
                finalizers.append("orphan")
            elif propagation_policy == "Foreground" and "foregroundDeletion" not in finalizers and not nmeta.get(
                "deletionTimestamp"
            ):
                finalizers.append("foregroundDeletion")
            ns_pending = res.kind == "Namespace" and bool((new.get("spec") or {}).get("finalizers"))
            if finalizers or ns_pending or graceful is not None:
                if nmeta.get("deletionTimestamp"):
                    if graceful is not None and graceful < int(nmeta.get("deletionGracePeriodSeconds") or 0):
                        nmeta["deletionGracePeriodSeconds"] = graceful
                    elif not (graceful == 0 and not finalizers and res.kind == "Pod"):
                        return self.present(res, cur), False
                else:
                    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=graceful or 0)
                    nmeta["deletionTimestamp"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
                    nmeta["deletionGracePeriodSeconds"] = graceful or 0
                if finalizers:
                    nmeta["finalizers"] = finalizers
                if res.kind == "Namespace":
                    new.setdefault("status", {})["phase"] = "Terminating"
                if not (graceful == 0 and not finalizers and not ns_pending):
                    if opts.dry_run:
                        return self.present(res, with_rv(new, kv.mod_revision)), False
                    try:
                        nkv = await self.store.update(res.key(ns, name), encode_stored(new), kv.mod_revision)
                    except base.Conflict:
                        continue
                    except base.KeyNotFound:
                        raise errors.not_found(res.resource, name, res.group) from None
                    return self.present(res, with_rv(new, nkv.mod_revision), private=True), False
            if opts.dry_run:
                return self.present(res, cur), True
            try:
                dkv = await self.store.delete(res.key(ns, name), kv.mod_revision)
            except base.Conflict:
                continue
            except base.KeyNotFound:
                raise errors.not_found(res.resource, name, res.group) from None
            self.sem.release(res, cur)
            if res.kind == "Service" and not res.group:
                await self._unreserve(res.key(ns, name), *semantics._held(cur))
            return self.present(res, with_rv(cur, dkv.mod_revision), private=True), True
        raise errors.conflict(res.resource, name, res.group, "too many concurrent writers, try again")

    @staticmethod
    def _graceful(res: Resource, obj: dict[str, Any], grace: int | None) -> int | None:
        """Seconds of graceful deletion for pods bound to a node (None = delete at once)."""
        if res.kind != "Pod":
            return None
        spec = obj.get("spec") or {}
        phase = (obj.get("status") or {}).get("phase")
        if not spec.get("nodeName") or phase in ("Succeeded", "Failed"):
            return None
        if grace is None:
            g = spec.get("terminationGracePeriodSeconds")
            grace = int(g) if isinstance(g, int) else 30
        if grace <= 0:
            return 0
        return grace

    async def delete_collection(
        self,
        resource: Resource | str,
        namespace: str | None,
        selector: Selector = EVERYTHING,
        grace_period_seconds: int | None = None,
        opts: WriteOptions | None = None,
        propagation_policy: str | None = None,
    ) -> ObjList:
        res = _res(resource)
        page = await self.list_page(res, namespace, selector)
        out = []
        for o in page.objs:
            m = o["metadata"]
            try:
                obj, _ = await self.delete(res, m.get("namespace"), m["name"], None, grace_period_seconds, opts,
                                           propagation_policy)
            except ApiError as e:
                if e.code == 404:
                    continue
                raise
            out.append(obj)
        return out

    async def bind(self, namespace: str, name: str, binding: dict[str, Any], opts: WriteOptions | None = None) -> None:
        """pods/binding: set spec.nodeName once (the scheduler's write)."""
        target = (binding.get("target") or {}) if isinstance(binding, dict) else {}
        node = target.get("name")
        if not node or not isinstance(node, str):
            raise errors.invalid("Binding", name, [errors.cause("target.name", "Required value", "FieldValueRequired")])
        res = by_name("pods")

        def mutate(cur: dict[str, Any]) -> dict[str, Any]:
            if cur["metadata"].get("deletionTimestamp"):
                raise errors.conflict("pods", name, "", f"pod {name} is being deleted, cannot be assigned to a host")
            spec = cur.get("spec") or {}
            if spec.get("nodeName"):
                raise errors.conflict("pods", name, "", f"pod {name} is already assigned to node \"{spec['nodeName']}\"")
            new = copy.deepcopy(cur)
            new.setdefault("spec", {})["nodeName"] = node
            conds = new.setdefault("status", {}).setdefault("conditions", [])
            conds[:] = [c for c in conds if c.get("type") != "PodScheduled"]
            conds.append({"type": "PodScheduled", "status": "True", "lastProbeTime": None,
                          "lastTransitionTime": now_rfc3339()})
            return new

        await self._guaranteed_update(res, namespace, name, mutate, opts or WriteOptions(), "binding",
                                      conditional=False)


class _Snap:
    """A CachedObject-shaped snapshot read straight from the store (exact-RV lists)."""

    __slots__ = ("key", "rev", "obj", "raw")

    def __init__(self, key: str, rev: int, obj: dict[str, Any], raw: bytes) -> None:
        self.key, self.rev, self.obj, self.raw = key, rev, obj, raw


def _same_ignoring_managed(cur: dict[str, Any], new: dict[str, Any]) -> bool:
    """A no-op write (kube-apiserver skips it: same RV, no event). The RV and managedFields' timestamps
    do not count; a change of ownership does (kubectl's client-side -> server-side apply migration
    is a managedFields-only patch)."""

    def comparable(obj: dict[str, Any], fields: Any) -> dict[str, Any]:
        meta = {k: v for k, v in obj["metadata"].items() if k not in ("resourceVersion", "managedFields")}
        meta["managedFields"] = [{k: v for k, v in e.items() if k != "time"} if isinstance(e, dict) else e
                                 for e in fields or []]
        return {**obj, "metadata": meta}

    kept = cur["metadata"].get("managedFields")
    sent = new["metadata"].get("managedFields", kept)  # a write without managedFields keeps them
    a, b = comparable(cur, kept), comparable(new, sent)
    return orjson.dumps(a, option=orjson.OPT_SORT_KEYS) == orjson.dumps(b, option=orjson.OPT_SORT_KEYS)



def _drop_nulls(d: dict[str, Any], depth: int = 0) -> None:
    """Remove null-valued keys from nested objects (lists are left as they are)."""
    if depth > 64:
        return
    for k in [k for k, v in d.items() if v is None]:
        del d[k]
    for v in d.values():
        if isinstance(v, dict):
            _drop_nulls(v, depth + 1)
