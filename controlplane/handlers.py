"""REST: URL parsing, query options, body decoding, content negotiation, and one function per verb.

Every failure is an ApiError rendered as a Status by the server's middleware; handlers never
write half a response except for watches, whose errors after the headers are ERROR events.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson
import yaml
from aiohttp import web
from multidict import CIMultiDict

from controlplane import errors, resources, tables
from controlplane.registry import PATCH_TYPES, Registry, WriteOptions
from controlplane.resources import Resource
from controlplane.selectors import parse as parse_selector

log = logging.getLogger("controlplane.handlers")

MAX_BODY = 3 * 1024 * 1024
JSON_CT = "application/json"
BODY_TYPES = ("application/json", "application/yaml", "application/apply-patch+yaml", *PATCH_TYPES)
TABLE_CT = "application/json;as=Table;v=v1;g=meta.k8s.io"
WATCH_TIMEOUT_DEFAULT = 1800.0
ObjList = list[dict[str, Any]]


# ---------------------------------------------------------------- paths


@dataclass(slots=True)
class Target:
    res: Resource
    namespace: str | None  # None: all namespaces (or cluster-scoped)
    name: str
    subresource: str


def _seg(s: str) -> str:
    return unquote(s)


def parse_resource_path(path: str) -> Target | None:
    """Target for a resource URL, None if `path` is not one (the caller then answers 404)."""
    parts = [p for p in path.split("/") if p != ""]
    if not parts:
        return None
    if parts[0] == "api" and len(parts) >= 3:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[0] == "apis" and len(parts) >= 4:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    rest = [_seg(p) for p in rest]
    ns: str | None = None
    if rest[0] == "namespaces" and len(rest) >= 3 and not (len(rest) == 3 and rest[2] in ("status", "finalize")):
        ns = rest[1]
        rest = rest[2:]
    if len(rest) > 3:
        return None
    res = resources.lookup(group, version, rest[0])
    if res is None:
        return None
    name = rest[1] if len(rest) >= 2 else ""
    sub = rest[2] if len(rest) == 3 else ""
    if ns is not None and not res.namespaced:
        return None
    if sub and sub not in res.subresources:
        return None
    if res.namespaced and name and ns is None:
        return None  # /api/v1/pods/NAME is not a path
    return Target(res, ns, name, sub)


# ---------------------------------------------------------------- query options


def _bool(q: Any, key: str) -> bool | None:
    v = q.get(key)
    if v is None:
        return None
    if v in ("1", "true", "True", "t", "T", "TRUE"):
        return True
    if v in ("0", "false", "False", "f", "F", "FALSE", ""):
        return False
    raise errors.bad_request(f'invalid boolean value for {key}: "{v}"')


def _int(q: Any, key: str, *, minimum: int = 0) -> int | None:
    v = q.get(key)
    if v is None or v == "":
        return None
    try:
        n = int(v)
    except ValueError:
        raise errors.bad_request(f'invalid value for {key}: "{v}": must be an integer') from None
    if n < minimum:
        raise errors.bad_request(f'invalid value for {key}: "{v}": must be >= {minimum}')
    return n


def write_options(request: web.Request, *, patch: bool = False) -> WriteOptions:
    q = request.query
    dry = q.getall("dryRun", [])
    for d in dry:
        if d != "All":
            raise errors.invalid("CreateOptions", "", [errors.cause(
                "dryRun", f'Unsupported value: "{d}": supported values: "All"', "FieldValueNotSupported")],
                "meta.k8s.io")
    fv = q.get("fieldValidation", "")
    if fv not in ("", "Strict", "Warn", "Ignore"):
        raise errors.bad_request(
            f'fieldValidation: Unsupported value: "{fv}": supported values: "Ignore", "Strict", "Warn"'
        )
    fm = q.get("fieldManager", "")
    if len(fm) > 128:
        raise errors.invalid("CreateOptions", "", [errors.cause(
            "fieldManager", "Too long: may not be more than 128 bytes", "FieldValueTooLong")], "meta.k8s.io")
    if not fm:
        ua = request.headers.get("User-Agent", "")
        fm = ua.split("/")[0] if ua else "unknown"
    force = _bool(q, "force") or False
    return WriteOptions(dry_run=bool(dry), field_manager=fm, field_validation=fv or "Warn", force=force)


# ---------------------------------------------------------------- bodies


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors/aliases: a 3 MiB body must not expand into gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            ev = self.peek_event()
            raise yaml.YAMLError(f"YAML aliases are not supported (line {ev.start_mark.line + 1})")
        return super().compose_node(parent, index)


def _media_type(request: web.Request) -> str:
    ct = request.headers.get("Content-Type", "")
    return ct.split(";", 1)[0].strip().lower()


async def read_body(request: web.Request) -> bytes:
    cl = request.content_length
    if cl is not None and cl > MAX_BODY:
        raise errors.too_large_body(MAX_BODY)
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.content.iter_any():
        total += len(chunk)
        if total > MAX_BODY:
            raise errors.too_large_body(MAX_BODY)
        chunks.append(chunk)
    return b"".join(chunks)


def decode_body(raw: bytes, media: str) -> Any:
    """JSON (empty Content-Type means JSON) or YAML; anything else (protobuf, CBOR, ...) is 415."""
    if not raw.strip():
        raise errors.bad_request("the request body is empty; a JSON object is required")
    if media in ("", "application/json", "application/merge-patch+json", "application/strategic-merge-patch+json",
                 "application/json-patch+json", "application/apply-patch+json"):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise errors.bad_request(f"error decoding JSON body: {e}") from None
    if media in ("application/yaml", "application/apply-patch+yaml", "application/x-yaml", "text/yaml"):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise errors.bad_request("error decoding YAML body: not UTF-8") from None
        try:
            return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - SafeLoader subclass
        except yaml.YAMLError as e:
            msg = str(e).replace("\n", " ")
            raise errors.bad_request(f"error decoding YAML body: {msg}") from None
        except RecursionError:
            raise errors.bad_request("error decoding YAML body: nested too deeply") from None
    if media == "application/vnd.kubernetes.protobuf":
        from controlplane import protobuf

        return protobuf.decode(raw)
    raise errors.unsupported_media_type(media, ["application/json", "application/yaml"])


def _check_json_safe(obj: Any) -> None:
    """Everything decoded must re-encode (YAML can produce dates, sets, non-string keys...)."""
    try:
        orjson.dumps(obj)
    except (TypeError, orjson.JSONEncodeError) as e:
        raise errors.bad_request(f"the body is not representable as JSON: {e}") from None


# ---------------------------------------------------------------- responses


def json_response(body: Any, status: int = 200, headers: Any = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=JSON_CT, headers=headers)


def raw_json_response(raw: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=raw, status=status, content_type=JSON_CT, headers=headers)


def wants_table(request: web.Request) -> bool:
    acc = request.headers.get("Accept", "")
    return "as=Table" in acc and "g=meta.k8s.io" in acc


def check_accept(request: web.Request) -> None:
    acc = request.headers.get("Accept", "")
    if not acc:
        return
    for part in acc.split(","):
        mt = part.split(";", 1)[0].strip().lower()
        if mt in ("application/json", "*/*", "application/*", "") or "as=Table" in part:
            return
    raise errors.not_acceptable(
        f"only the following media types are accepted: application/json (Accept was {acc!r})"
    )


def _warn_headers(opts: WriteOptions) -> CIMultiDict[str] | None:
    """One `Warning: 299 - "..."` header per warning, as kube-apiserver sends them."""
    if not opts.warnings:
        return None
    h: CIMultiDict[str] = CIMultiDict()
    for w in opts.warnings:
        text = w.replace("\\", "\\\\").replace('"', '\\"')
        # a field name from the request may hold control characters: never put them in a header
        text = "".join(c if " " <= c <= "~" else f"\\u{ord(c):04x}" for c in text)
        h.add("Warning", '299 - "' + text + '"')
    return h


# ---------------------------------------------------------------- verbs


class Handlers:
    def __init__(self, registry: Registry, *, field_validation: Any = None) -> None:
        self.reg = registry
        self.watches: set[asyncio.Task[Any]] = set()
        self.open_watches: set[Any] = set()  # Watch objects; closing one ends its stream cleanly

    async def dispatch(self, request: web.Request, t: Target) -> web.StreamResponse:
        m = request.method
        res = t.res
        if t.subresource == "binding":
            if m != "POST":
                raise errors.method_not_allowed()
            return await self.bind(request, t)
        if t.subresource == "finalize" and m != "PUT":
            raise errors.method_not_allowed()
        if not t.name:
            if m in ("GET", "HEAD"):
                if _bool(request.query, "watch"):
                    return await self.watch(request, t)
                return await self.list(request, t)
            if m == "POST":
                if t.namespace is None and res.namespaced:
                    raise errors.method_not_allowed("POST requires a namespace for namespaced resources")
                return await self.create(request, t)
            if m == "DELETE":
                return await self.delete_collection(request, t)
            raise errors.method_not_allowed()
        if m in ("GET", "HEAD"):
            if _bool(request.query, "watch"):
                return await self.watch(request, t)
            return await self.get(request, t)
        if m == "PUT":
            return await self.update(request, t)
        if m == "PATCH":
            return await self.patch(request, t)
        if m == "DELETE":
            if t.subresource:
                raise errors.method_not_allowed()
            return await self.delete(request, t)
        raise errors.method_not_allowed()

    # ---- reads

    async def get(self, request: web.Request, t: Target) -> web.StreamResponse:
        rv = request.query.get("resourceVersion", "")
        co = await self.reg.get_cached(t.res, t.namespace or "", t.name, rv)
        if wants_table(request):
            obj = self.reg.present(t.res, co.obj, private=True)
            return self._table_response([obj], t.res, request, rv=obj["metadata"].get("resourceVersion", ""))
        check_accept(request)
        return raw_json_response(self.reg.present_raw(t.res, co))

    def _list_params(self, request: web.Request, t: Target) -> dict[str, Any]:
        q = request.query
        rv = q.get("resourceVersion", "")
        rvm = q.get("resourceVersionMatch", "")
        cont = q.get("continue", "")
        if rvm not in ("", "NotOlderThan", "Exact"):
            raise errors.invalid_list_options(
                "resourceVersionMatch", f'Unsupported value: "{rvm}": supported values: "Exact", "NotOlderThan"')
        if rvm and not rv and not (rvm == "NotOlderThan" and _bool(q, "sendInitialEvents") is not None):
            raise errors.invalid_list_options(
                "resourceVersionMatch", "resourceVersionMatch is forbidden unless resourceVersion is provided")
        if rvm and cont:
            raise errors.invalid_list_options(
                "resourceVersionMatch", "resourceVersionMatch is forbidden when continue is provided")
        if rvm == "Exact" and rv == "0":
            raise errors.invalid_list_options(
                "resourceVersionMatch", 'resourceVersionMatch "exact" is forbidden for resourceVersion "0"')
        if rv and rv != "0":
            try:
                if int(rv) < 0:
                    raise ValueError
            except ValueError:
                raise errors.bad_request(f'invalid resourceVersion "{rv}": must be an integer') from None
        sel = parse_selector(q.get("labelSelector", ""), q.get("fieldSelector", ""), t.res.resource)
        return {"rv": rv, "rvm": rvm, "cont": cont, "sel": sel, "limit": _int(q, "limit") or 0}

    async def list(self, request: web.Request, t: Target) -> web.StreamResponse:
        if _bool(request.query, "sendInitialEvents") is not None:
            raise errors.invalid_list_options("sendInitialEvents", "sendInitialEvents is forbidden for list")
        p = self._list_params(request, t)
        page = await self.reg.list_page(
            t.res, t.namespace, p["sel"], limit=p["limit"], continue_token=p["cont"],
            resource_version=p["rv"], resource_version_match=p["rvm"],
        )
        if wants_table(request):
            # read-only rendering: the cache's shared objects are not copied
            objs = [self.reg.present(t.res, o, private=True) for o in page.objs]
            return self._table_response(objs, t.res, request, rv=str(page.rv), cont=page.continue_token,
                                        remaining=page.remaining)
        check_accept(request)
        meta: dict[str, Any] = {"resourceVersion": str(page.rv)}
        if page.continue_token:
            meta["continue"] = page.continue_token
            if page.remaining is not None:
                meta["remainingItemCount"] = page.remaining
        head = orjson.dumps({"kind": t.res.list_kind, "apiVersion": t.res.api_version, "metadata": meta})
        # splice the cached per-object bytes into the list without re-encoding them
        body = b"".join((head[:-1], b',"items":[', b",".join(page.raw_items), b"]}"))
        return raw_json_response(body)

    def _table_response(self, objs: ObjList, res: Resource, request: web.Request, *, rv: str,
                        cont: str = "", remaining: int | None = None) -> web.Response:
        include = request.query.get("includeObject", "Metadata")
        if include not in ("None", "Metadata", "Object"):
            raise errors.bad_request(f'includeObject: Unsupported value: "{include}"')
        table = tables.table(res, objs, include=include)
        table["metadata"] = {"resourceVersion": rv}
        if cont:
            table["metadata"]["continue"] = cont
            if remaining is not None:
                table["metadata"]["remainingItemCount"] = remaining
        return web.Response(body=orjson.dumps(table), content_type=JSON_CT)

    async def watch(self, request: web.Request, t: Target) -> web.StreamResponse:
        from controlplane.watch import Watch

        q = request.query
        p = self._list_params(request, t)
        if t.name:
            p["sel"] = parse_selector(q.get("labelSelector", ""),
                                      ",".join(x for x in (q.get("fieldSelector", ""), f"metadata.name={t.name}") if x),
                                      t.res.resource)
        sie = _bool(q, "sendInitialEvents")
        bookmarks = bool(_bool(q, "allowWatchBookmarks"))
        if p["cont"]:
            raise errors.invalid_list_options("continue", "continue is forbidden for watch")
        if sie is not None:
            if p["rvm"] != "NotOlderThan":
                raise errors.invalid_list_options(
                    "sendInitialEvents",
                    "sendInitialEvents is forbidden for watch unless resourceVersionMatch is set to NotOlderThan")
            if not bookmarks:
                raise errors.invalid_list_options(
                    "sendInitialEvents", "sendInitialEvents requires setting allowWatchBookmarks to true")
        elif p["rvm"]:
            raise errors.invalid_list_options(
                "resourceVersionMatch", "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided")
        timeout_s = _int(q, "timeoutSeconds")
        timeout = float(timeout_s) if timeout_s else WATCH_TIMEOUT_DEFAULT
        table = wants_table(request)
        if not table:
            check_accept(request)
        w = Watch(self.reg, t.res, t.namespace, p["sel"], p["rv"], bookmarks, sie, timeout)
        await w.start()  # 504 (too large RV) is still an HTTP status here
        resp = web.StreamResponse(status=200, headers={"Content-Type": TABLE_CT if table else JSON_CT,
                                                        "Cache-Control": "no-cache, private"})
        resp.enable_chunked_encoding()
        task = asyncio.current_task()
        if task is not None:
            self.watches.add(task)
        self.open_watches.add(w)
        try:
            await resp.prepare(request)
            first_table = True
            async for typ, obj, raw in w.raw_events():
                if table and typ in ("ADDED", "MODIFIED", "DELETED"):
                    tbl = tables.table(t.res, [obj], include=q.get("includeObject", "Metadata"),
                                       headers=first_table)
                    first_table = False
                    line = b'{"type":"' + typ.encode() + b'","object":' + orjson.dumps(tbl) + b"}\n"
                elif raw is not None:
                    line = b'{"type":"' + typ.encode() + b'","object":' + raw + b"}\n"
                else:
                    line = orjson.dumps({"type": typ, "object": obj}) + b"\n"
                await resp.write(line)
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError, ConnectionError):
            pass
        finally:
            w.close()
            self.open_watches.discard(w)
            if task is not None:
                self.watches.discard(task)
        return resp

    # ---- writes

    async def _body(self, request: web.Request, *, allow_types: tuple[str, ...] | None = None) -> tuple[Any, bytes]:
        media = _media_type(request)
        if allow_types is not None and media not in allow_types:
            raise errors.unsupported_media_type(media or "(none)", list(allow_types))
        raw = await read_body(request)
        obj = decode_body(raw, media)
        _check_json_safe(obj)
        return obj, raw

    def _field_validation(self, res: Resource, obj: Any, raw: bytes, opts: WriteOptions, *,
                          patch_type: str = "") -> None:
        from controlplane import semantics

        semantics.check_unknown_fields(res, obj, raw, opts, patch_type=patch_type)

    async def create(self, request: web.Request, t: Target) -> web.StreamResponse:
        opts = write_options(request)
        obj, raw = await self._body(request)
        if not isinstance(obj, dict):
            raise errors.bad_request("the body of the request must be a JSON object")
        if t.subresource:
            raise errors.method_not_allowed()
        self._field_validation(t.res, obj, raw, opts)
        created = await self.reg.create(t.res, obj, t.namespace, opts)
        return json_response(created, 201, headers=_warn_headers(opts))

    async def update(self, request: web.Request, t: Target) -> web.StreamResponse:
        opts = write_options(request)
        obj, raw = await self._body(request)
        if not isinstance(obj, dict):
            raise errors.bad_request("the body of the request must be a JSON object")
        self._field_validation(t.res, obj, raw, opts)
        out = await self.reg.update(t.res, obj, t.namespace, t.name, opts, subresource=t.subresource)
        return json_response(out, 200, headers=_warn_headers(opts))

    async def patch(self, request: web.Request, t: Target) -> web.StreamResponse:
        opts = write_options(request, patch=True)
        media = _media_type(request)
        ptype = PATCH_TYPES.get(media)
        if ptype is None:
            raise errors.unsupported_media_type(media or "(none)", list(PATCH_TYPES))
        body, raw = await self._body(request)
        if ptype == "json":
            if not isinstance(body, list):
                raise errors.bad_request("json patch: the patch must be a JSON array of operations")
        elif not isinstance(body, dict):
            raise errors.bad_request(f"{media}: the patch must be a JSON object")
        if ptype != "json":
            self._field_validation(t.res, body, raw, opts, patch_type=ptype)
        if ptype == "apply" and not request.query.get("fieldManager"):
            raise errors.invalid("PatchOptions", "", [errors.cause(
                "fieldManager", "Required value: is required for apply patch", "FieldValueRequired")],
                "meta.k8s.io")
        out, created = await self.reg.patch(t.res, t.namespace, t.name, ptype, body, opts,
                                            subresource=t.subresource)
        return json_response(out, 201 if created else 200, headers=_warn_headers(opts))

    async def _delete_options(self, request: web.Request) -> dict[str, Any]:
        q = request.query
        opts: dict[str, Any] = {}
        if request.can_read_body:
            raw = await read_body(request)
            # typed Go clients may send DeleteOptions as protobuf: the query parameters still apply
            if raw.strip() and _media_type(request) != "application/vnd.kubernetes.protobuf":
                body = decode_body(raw, _media_type(request))
                if not isinstance(body, dict):
                    raise errors.bad_request("DeleteOptions must be a JSON object")
                if body.get("kind") not in (None, "DeleteOptions"):
                    raise errors.bad_request(f"expected DeleteOptions, got {body.get('kind')}")
                opts = body
        gp = _int(q, "gracePeriodSeconds", minimum=-1 << 62)
        if gp is not None:
            opts["gracePeriodSeconds"] = gp
        if q.get("propagationPolicy"):
            opts["propagationPolicy"] = q["propagationPolicy"]
        if q.getall("dryRun", []):
            opts["dryRun"] = q.getall("dryRun")
        pp = opts.get("propagationPolicy")
        if pp not in (None, "Orphan", "Background", "Foreground"):
            raise errors.invalid("DeleteOptions", "", [errors.cause(
                "propagationPolicy", f'Unsupported value: "{pp}": supported values: "Foreground", "Background", '
                '"Orphan", "nil"', "FieldValueNotSupported")], "meta.k8s.io")
        g = opts.get("gracePeriodSeconds")
        if g is not None and (not isinstance(g, int) or isinstance(g, bool)):
            raise errors.bad_request("gracePeriodSeconds must be an integer")
        pre = opts.get("preconditions")
        if pre is not None and not isinstance(pre, dict):
            raise errors.bad_request("preconditions must be an object")
        dry = opts.get("dryRun") or []
        if not isinstance(dry, list) or any(d != "All" for d in dry):
            raise errors.invalid("DeleteOptions", "", [errors.cause(
                "dryRun", f'Unsupported value: {dry!r}: supported values: "All"', "FieldValueNotSupported")],
                "meta.k8s.io")
        if opts.get("orphanDependents") is True and pp is None:
            opts["propagationPolicy"] = "Orphan"
        return opts

    async def delete(self, request: web.Request, t: Target) -> web.StreamResponse:
        d = await self._delete_options(request)
        wo = WriteOptions(dry_run=bool(d.get("dryRun")))
        obj, _gone = await self.reg.delete(
            t.res, t.namespace, t.name, d.get("preconditions"), d.get("gracePeriodSeconds"), wo,
            d.get("propagationPolicy"),
        )
        return json_response(obj, 200)

    async def delete_collection(self, request: web.Request, t: Target) -> web.StreamResponse:
        d = await self._delete_options(request)
        q = request.query
        sel = parse_selector(q.get("labelSelector", ""), q.get("fieldSelector", ""), t.res.resource)
        wo = WriteOptions(dry_run=bool(d.get("dryRun")))
        items = await self.reg.delete_collection(t.res, t.namespace, sel, d.get("gracePeriodSeconds"), wo,
                                                 d.get("propagationPolicy"))
        rv = await self.reg.store.current_revision()
        return json_response({"kind": t.res.list_kind, "apiVersion": t.res.api_version,
                              "metadata": {"resourceVersion": str(rv)}, "items": items})

    async def bind(self, request: web.Request, t: Target) -> web.StreamResponse:
        opts = write_options(request)
        body, _raw = await self._body(request)
        if not isinstance(body, dict) or body.get("kind") != "Binding":
            raise errors.bad_request("expected a Binding object")
        bname = (body.get("metadata") or {}).get("name")
        if bname not in (None, t.name):
            raise errors.bad_request(f"the name of the binding ({bname}) does not match the pod ({t.name})")
        await self.reg.bind(t.namespace or "default", t.name, body, opts)
        return json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                              "code": 201}, 201)
