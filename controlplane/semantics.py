"""Glue between the registry and the per-kind object semantics (H2b's pure modules).

One place maps the registry's pipeline steps onto defaults / validation / alloc / patch /
fieldvalidation, so the registry itself stays kind-agnostic. Modules are imported lazily and a
missing optional hook degrades to "no extra rule" rather than failing the write.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
from collections.abc import Iterator
from typing import Any

from controlplane import alloc, errors
from controlplane.errors import ApiError
from controlplane.resources import Resource

log = logging.getLogger("controlplane.semantics")


def _mod(name: str) -> Any:
    try:
        return importlib.import_module(f"controlplane.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"controlplane.{name}":
            raise
        return None


@contextlib.contextmanager
def _guard(res: Resource, step: str) -> Iterator[None]:
    """A semantics module tripping over an odd-shaped object answers 400, not 500 (and is logged)."""
    try:
        yield
    except ApiError:
        raise
    except (TypeError, AttributeError, KeyError, ValueError, IndexError) as e:
        log.warning("%s of %s failed on an odd-shaped object: %s: %s", step, res.kind, type(e).__name__, e)
        raise errors.bad_request(f"{res.kind} cannot be handled: {step} failed on the object's shape ({e})") from None


def _causes(errs: list[Any]) -> list[dict[str, str]]:
    return [e.cause() if hasattr(e, "cause") else dict(e) for e in errs]


def _held(svc: dict[str, Any]) -> tuple[set[str], set[int]]:
    """(cluster IPs, node ports incl. healthCheckNodePort) a Service holds."""
    ips: set[str] = set()
    ports: set[int] = set()
    if alloc.needs_cluster_ip(svc):
        ips = {i for i in alloc._ips_of(svc) if isinstance(i, str)}
    ports = {p for p in alloc._node_ports_of(svc) if isinstance(p, int) and not isinstance(p, bool)}
    return ips, ports


class Semantics:
    def __init__(self, service_cidr: str, node_port_range: str) -> None:
        self.ips = alloc.ClusterIPAllocator(service_cidr)
        self.ports = alloc.NodePortAllocator(node_port_range)
        self.ip_family = self.ips.family
        self._ip_owner: dict[str, str] = {}
        self._port_owner: dict[int, str] = {}

    # ---- allocation

    def rebuild_allocations(self, services: list[dict[str, Any]]) -> list[str]:
        return alloc.rebuild(self.ips, self.ports, services)

    def allocate(
        self, res: Resource, old: dict[str, Any] | None, new: dict[str, Any], *, dry_run: bool
    ) -> alloc.ServiceTxn | None:
        if res.kind != "Service" or res.group:
            return None
        try:
            return alloc.allocate_service(old, new, self.ips, self.ports, dry_run=dry_run)
        except alloc.AllocationFailed as e:
            if e.internal:
                raise errors.internal(e.message) from None
            name = (new.get("metadata") or {}).get("name", "")
            raise errors.invalid("Service", name, _causes(e.errors)) from None

    def release(self, res: Resource, obj: dict[str, Any]) -> None:
        if res.kind == "Service" and not res.group:
            alloc.release_service(obj, self.ips, self.ports)

    def observe_service(self, typ: str, key: str, obj: dict[str, Any] | None, prev: dict[str, Any] | None) -> None:
        """A Service event from the store (any apiserver): mark what it holds, free what it let go.
        A value is freed only by the Service recorded as holding it, so a late event cannot free a
        value re-allocated to another Service since."""
        held = _held(obj) if typ == "PUT" and obj is not None else (set(), set())
        before = _held(prev) if prev is not None else (set(), set())
        for ip in held[0]:
            self._ip_owner[ip] = key
            if self.ips.contains(ip) and not self.ips.has(ip):
                self.ips.allocate(ip)
        for port in held[1]:
            self._port_owner[port] = key
            if self.ports.contains(port) and not self.ports.has(port):
                self.ports.allocate(port)
        for ip in before[0] - held[0]:
            if self._ip_owner.get(ip) == key:
                del self._ip_owner[ip]
                self.ips.release(ip)
        for port in before[1] - held[1]:
            if self._port_owner.get(port) == key:
                del self._port_owner[port]
                self.ports.release(port)

    def mark_taken(self, kind: str, value: str | int) -> None:
        """Another apiserver holds `value`: never hand it out here (freed by that Service's DELETE event)."""
        if kind == "clusterips" and isinstance(value, str):
            if self.ips.contains(value) and not self.ips.has(value):
                self.ips.allocate(value)
        elif isinstance(value, int) and self.ports.contains(value) and not self.ports.has(value):
            self.ports.allocate(value)

    # ---- defaulting / validation

    def prepare_create(self, res: Resource, obj: dict[str, Any]) -> None:
        pass

    def prepare_update(self, res: Resource, old: dict[str, Any], new: dict[str, Any]) -> None:
        check_types(res, new)  # before anything reads the object's shape
        if res.kind == "Service" and not res.group:
            with _guard(res, "allocation"):
                alloc.prepare_service_update(old, new)

    def default(self, res: Resource, obj: dict[str, Any], *, create: bool = True) -> None:
        check_types(res, obj)
        d = _mod("defaults")
        if d is not None:
            with _guard(res, "defaulting"):
                d.apply_defaults(res.kind, obj, create=create, ip_family=self.ip_family)

    def validate_create(self, res: Resource, obj: dict[str, Any]) -> None:
        v = _mod("validation")
        if v is None or not hasattr(v, "validate_create"):
            return
        with _guard(res, "validation"):
            errs = v.validate_create(res.kind, obj)
        if errs:
            name = (obj.get("metadata") or {}).get("name", "")
            raise errors.invalid(res.kind, name, _causes(errs), res.group)

    def validate_update(self, res: Resource, new: dict[str, Any], old: dict[str, Any], subresource: str) -> None:
        v = _mod("validation")
        if v is None or not hasattr(v, "validate_update"):
            return
        if subresource == "binding":
            return
        with _guard(res, "validation"):
            if subresource == "status" and hasattr(v, "validate_status_update"):
                errs = v.validate_status_update(res.kind, new, old)
            else:
                errs = v.validate_update(res.kind, new, old)
        if errs:
            name = (new.get("metadata") or {}).get("name", "")
            raise errors.invalid(res.kind, name, _causes(errs), res.group)

    # ---- managed fields

    def managed_fields_update(
        self,
        res: Resource,
        old: dict[str, Any] | None,
        new: dict[str, Any],
        manager: str,
        operation: str,
        subresource: str = "",
    ) -> None:
        p = _mod("patch")
        if p is None or not hasattr(p, "update_managed_fields"):
            return
        try:
            with _guard(res, "managedFields bookkeeping"):
                p.update_managed_fields(old, new, manager or "unknown", operation, res.api_version, subresource)
        except ImportError:  # controlplane.ssa not there yet: no managedFields bookkeeping
            return

    # ---- patches

    def apply_patch(
        self, res: Resource, current: dict[str, Any], patch_type: str, body: Any, opts: Any, subresource: str
    ) -> dict[str, Any]:
        with _guard(res, "patch"):
            return self._apply_patch(res, current, patch_type, body, opts, subresource)

    def _apply_patch(
        self, res: Resource, current: dict[str, Any], patch_type: str, body: Any, opts: Any, subresource: str
    ) -> dict[str, Any]:
        p = _mod("patch") or _FallbackPatch
        cur = copy.deepcopy(current)
        try:
            if patch_type == "json":
                out = p.json_patch(cur, body)
                fv = _mod("fieldvalidation")
                if fv is not None and isinstance(out, dict) and (not res.group or res.group == "discovery.k8s.io"):
                    fv.prune(res.kind, out)  # a JSON patch may add fields the kind does not have
                return out
            if patch_type == "merge":
                return p.merge_patch(cur, body)
            if patch_type == "strategic":
                return p.strategic_merge_patch(cur, body, res.kind)
            if patch_type == "apply":
                try:
                    return p.server_side_apply(
                        cur, body, res.kind, manager=opts.field_manager, force=opts.force,
                        api_version=res.api_version, subresource=subresource,
                    )
                except ImportError:  # controlplane.ssa not there yet
                    return _FallbackPatch.server_side_apply(cur, body, res.kind)
        except ApiError:
            raise
        except getattr(p, "PatchError", ValueError) as e:
            raise _patch_error(e) from None
        raise errors.unsupported_media_type(patch_type, list(_PATCH_CT))

    def apply_create(self, res: Resource, body: Any, manager: str) -> dict[str, Any]:
        p = _mod("patch") or _FallbackPatch
        if not isinstance(body, dict):
            raise errors.bad_request("the apply patch must be an object")
        try:
            return p.server_side_apply(None, body, res.kind, manager=manager, force=False,
                                       api_version=res.api_version, subresource="")
        except ImportError:
            return _FallbackPatch.server_side_apply(None, body, res.kind)
        except ApiError:
            raise
        except getattr(p, "PatchError", ValueError) as e:
            raise _patch_error(e) from None


_PATCH_CT = (
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/apply-patch+yaml",
)


def _patch_error(e: Exception) -> ApiError:
    code = getattr(e, "code", 422)
    reason = getattr(e, "reason", "Invalid" if code == 422 else "BadRequest")
    details = getattr(e, "details", None)
    return ApiError(code, reason, str(e), details=details)


def check_unknown_fields(res: Resource, obj: Any, raw: bytes, opts: Any, *, patch_type: str = "") -> None:
    """fieldValidation: Strict -> 400 on unknown/duplicate fields, Warn -> Warning headers, Ignore -> drop
    them. Unknown fields never reach storage (they are pruned in every mode), as for built-in kinds."""
    fv = _mod("fieldvalidation")
    if fv is None or not isinstance(obj, dict):
        return
    kind = res.kind if not res.group or res.group == "discovery.k8s.io" else ""
    if not kind:
        return
    if opts.field_validation == "Ignore":
        fv.prune(kind, obj, patch_type=patch_type)  # keeps a strategic patch's $-directives
        return
    problems = fv.check(kind, obj, raw=raw, patch_type=patch_type, api_version=res.api_version)
    if not problems:
        return
    if opts.field_validation == "Strict":
        raise errors.bad_request(fv.strict_message(kind, problems, res.api_version))
    opts.warnings.extend(str(p) for p in problems)


def check_types(res: Resource, obj: dict[str, Any]) -> None:
    """Wrong JSON types (a string where an int goes...) -> 400, as the typed decoder answers."""
    fv = _mod("fieldvalidation")
    if fv is None or (res.group and res.group != "discovery.k8s.io"):
        return
    errs = fv.type_errors(res.kind, obj)
    if errs:
        raise errors.bad_request(fv.decode_message(res.kind, errs[0], res.api_version))


class _FallbackPatch:
    """RFC 7386 / RFC 6902 only, used while controlplane.patch (strategic merge, SSA) is absent."""

    PatchError = ValueError

    @staticmethod
    def merge_patch(cur: Any, patch: Any) -> Any:
        if not isinstance(patch, dict):
            return copy.deepcopy(patch)
        out = dict(cur) if isinstance(cur, dict) else {}
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = _FallbackPatch.merge_patch(out.get(k), v)
        return out

    @staticmethod
    def strategic_merge_patch(cur: Any, patch: Any, kind: str) -> Any:
        def strip(p: Any) -> Any:
            if isinstance(p, dict):
                return {k: strip(v) for k, v in p.items() if not k.startswith("$")}
            return p

        return _FallbackPatch.merge_patch(cur, strip(patch))

    @staticmethod
    def server_side_apply(cur: Any, body: Any, kind: str, **kw: Any) -> Any:
        return _FallbackPatch.merge_patch(cur or {}, body)

    @staticmethod
    def json_patch(doc: Any, ops: Any) -> Any:
        def parse(path: str) -> list[str]:
            if path == "":
                return []
            if not path.startswith("/"):
                raise ValueError(f"invalid JSON pointer {path!r}")
            return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]

        def walk(d: Any, toks: list[str]) -> Any:
            for t in toks:
                if isinstance(d, dict) and t in d:
                    d = d[t]
                elif isinstance(d, list) and t.isdigit() and int(t) < len(d):
                    d = d[int(t)]
                else:
                    raise ValueError(f"path not found: /{'/'.join(toks)}")
            return d

        for op in ops:
            if not isinstance(op, dict) or not isinstance(op.get("op"), str) or not isinstance(op.get("path"), str):
                raise ValueError("each JSON patch operation needs op and path")
            kind, toks = op["op"], parse(op["path"])
            if kind == "test":
                if walk(doc, toks) != op.get("value"):
                    raise ValueError(f"test failed at {op['path']}")
                continue
            if kind in ("move", "copy"):
                val = copy.deepcopy(walk(doc, parse(op.get("from", ""))))
                if kind == "move":
                    doc = _FallbackPatch.json_patch(doc, [{"op": "remove", "path": op["from"]}])
                op, kind = {"op": "add", "path": op["path"], "value": val}, "add"
            if not toks:
                if kind in ("add", "replace"):
                    doc = copy.deepcopy(op.get("value"))
                    continue
                raise ValueError("cannot remove the whole document")
            parent = walk(doc, toks[:-1])
            last = toks[-1]
            if isinstance(parent, dict):
                if kind == "add" or (kind == "replace" and last in parent):
                    if "value" not in op:
                        raise ValueError("add/replace need a value")
                    parent[last] = copy.deepcopy(op["value"])
                elif kind == "remove" and last in parent:
                    del parent[last]
                else:
                    raise ValueError(f"{kind}: path not found: {op['path']}")
            elif isinstance(parent, list):
                if last == "-" and kind == "add":
                    parent.append(copy.deepcopy(op.get("value")))
                    continue
                if not last.isdigit():
                    raise ValueError(f"invalid array index {last!r}")
                i = int(last)
                if kind == "add" and i <= len(parent):
                    parent.insert(i, copy.deepcopy(op.get("value")))
                elif kind == "replace" and i < len(parent):
                    parent[i] = copy.deepcopy(op.get("value"))
                elif kind == "remove" and i < len(parent):
                    del parent[i]
                else:
                    raise ValueError(f"{kind}: index out of range: {op['path']}")
            else:
                raise ValueError(f"{kind}: path not found: {op['path']}")
        return doc
