"""One client watch over the watch cache: start-point rules, selector enter/leave, bookmarks, timeout.

Start (kubernetes.io api-concepts "Resource versions" / "Streaming lists"):
  RV unset / "0"            synthetic ADDED for the current matching objects, then changes after them
  RV N                      changes after N only; N older than the cache's history -> one ERROR 410
  sendInitialEvents=true    synthetic ADDED at (>=) RV, then a BOOKMARK annotated
                            k8s.io/initial-events-end, then changes
Events are translated per watcher as kube-apiserver's cacher does: an object that starts matching
the selector is ADDED, one that stops matching is DELETED (its previous state, at the event's RV).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from controlplane import errors
from controlplane.errors import ApiError
from controlplane.resources import Resource
from controlplane.selectors import Selector
from controlplane.store import base

if TYPE_CHECKING:
    from controlplane.registry import Registry

INITIAL_EVENTS_END = "k8s.io/initial-events-end"

# (type, object dict, pre-encoded object JSON or None)
RawEvent = tuple[str, dict[str, Any], bytes | None]


def _progress(w: Any, cache: Any) -> int:
    """Newest revision this watcher has provably seen everything up to (for bookmarks)."""
    rev = getattr(w, "progress_revision", None)
    if isinstance(rev, int):
        return rev
    # the cache pushes synchronously as it applies; a live watcher with an empty queue is
    # therefore up to date with the cache's revision
    if getattr(w, "_live", False) and not getattr(w, "_queue", True):
        return max(int(w.last_revision), int(cache.revision))
    return int(w.last_revision)


class Watch:
    def __init__(
        self,
        reg: Registry,
        res: Resource,
        namespace: str | None,
        selector: Selector,
        resource_version: str,
        allow_bookmarks: bool,
        send_initial_events: bool | None,
        timeout: float | None,
    ) -> None:
        self.reg = reg
        self.res = res
        self.prefix = res.prefix(namespace)
        self.selector = selector
        self.rv = resource_version
        self.allow_bookmarks = allow_bookmarks
        self.send_initial_events = send_initial_events
        self.timeout = timeout
        self.convert = res.group == "events.k8s.io"
        self._watcher: Any = None
        self._initial: list[Any] = []
        self._start_rev = 0
        self._error: ApiError | None = None

    def _obj(self, co: Any) -> tuple[dict[str, Any], bytes | None]:
        if self.convert:
            obj = self.reg.present(self.res, co.obj)
            return obj, orjson.dumps(obj)
        return co.obj, co.raw

    def bookmark(self, rev: int, initial_end: bool = False) -> dict[str, Any]:
        meta: dict[str, Any] = {"resourceVersion": str(rev)}
        if initial_end:
            meta["annotations"] = {INITIAL_EVENTS_END: "true"}
        return {"kind": self.res.kind, "apiVersion": self.res.api_version, "metadata": meta}

    async def start(self) -> None:
        """Resolve the start point; raises ApiError for errors that are answered as HTTP statuses."""
        cache = self.reg.cache
        rv = self.rv
        initial = self.send_initial_events
        if initial is None:
            initial = rv in ("", "0")
        if rv == "":
            await self.reg._fresh("")
        elif rv != "0":
            await self.reg._fresh(rv)  # waits (<=3 s) for a future RV, else 504 ResourceVersionTooLarge
        # list + watch registration with no await in between: nothing can slip through
        if initial:
            items, rev, _ = cache.list(self.prefix)
            self._initial = [c for c in items if self.selector.matches(c.obj)]
            start = rev
        else:
            start = cache.revision if rv in ("", "0") else int(rv)
        self._start_rev = start
        try:
            self._watcher = cache.watch(self.prefix, start)
        except base.Compacted as e:
            self._error = errors.expired_rv(start, e.compacted)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None

    async def raw_events(self) -> AsyncIterator[RawEvent]:
        """The event stream; call start() first. Ends at timeout, or when the cache drops the watcher."""
        if self._error is not None:
            yield "ERROR", self._error.status(), None
            return
        deadline = time.monotonic() + self.timeout if self.timeout else None
        for co in self._initial:
            obj, raw = self._obj(co)
            yield "ADDED", obj, raw
        self._initial = []
        if self.send_initial_events and self.allow_bookmarks:
            yield "BOOKMARK", self.bookmark(self._start_rev, initial_end=True), None
        w = self._watcher
        cache = self.reg.cache
        interval = self.reg.config.bookmark_interval
        sel = self.selector
        it = w.__aiter__()
        pending: asyncio.Task[Any] | None = None
        last_bookmark_rev = self._start_rev
        try:
            while True:
                wait = interval if self.allow_bookmarks else None
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    wait = left if wait is None else min(wait, left)
                if pending is None:
                    pending = asyncio.ensure_future(it.__anext__())
                done, _ = await asyncio.wait({pending}, timeout=wait)
                if not done:
                    if self.allow_bookmarks and (deadline is None or deadline - time.monotonic() > 0):
                        rev = _progress(w, cache)
                        if rev >= last_bookmark_rev:
                            last_bookmark_rev = rev
                            yield "BOOKMARK", self.bookmark(rev), None
                    continue
                task, pending = pending, None
                try:
                    ev = task.result()
                except StopAsyncIteration:
                    break
                cur_pass = ev.type == "PUT" and sel.matches(ev.obj.obj)
                if ev.type == "DELETE":
                    old_pass = sel.matches(ev.prev.obj if ev.prev is not None else ev.obj.obj)
                else:
                    old_pass = ev.prev is not None and sel.matches(ev.prev.obj)
                if cur_pass:
                    obj, raw = self._obj(ev.obj)
                    yield ("MODIFIED" if old_pass else "ADDED"), obj, raw
                elif old_pass:
                    if ev.type == "DELETE":
                        obj, raw = self._obj(ev.obj)
                    else:
                        base_obj = dict(ev.prev.obj)
                        base_obj["metadata"] = {**base_obj.get("metadata", {}), "resourceVersion": str(ev.rev)}
                        if self.convert:
                            base_obj = self.reg.present(self.res, base_obj)
                        obj, raw = base_obj, orjson.dumps(base_obj)
                    yield "DELETED", obj, raw
                last_bookmark_rev = max(last_bookmark_rev, ev.rev)
            if self.allow_bookmarks and w is not None:
                yield "BOOKMARK", self.bookmark(max(_progress(w, cache), last_bookmark_rev)), None
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            self.close()

    async def objects(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """For in-process consumers: (type, private copy of the object)."""
        try:
            await self.start()
        except ApiError as e:
            yield "ERROR", e.status()
            return
        async for typ, obj, _raw in self.raw_events():
            yield typ, obj if typ in ("BOOKMARK", "ERROR") else orjson.loads(orjson.dumps(obj))
