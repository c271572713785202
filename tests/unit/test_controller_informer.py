"""Informer semantics against a scripted registry: resume after a closed watch, relist (with the
difference replayed) after an ERROR, indexes, and own writes not echoed to their author."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from controlplane.controllers.informer import Informer

pytestmark = pytest.mark.unit


def obj(name: str, rv: int, uid: str = "", **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "uid": uid or f"u-{name}", "resourceVersion": str(rv),
                         "labels": labels}}


class Scripted:
    """list() returns `state`; each watch() plays the next script of events, then ends."""

    def __init__(self, state: list[dict[str, Any]], scripts: list[list[tuple[str, dict[str, Any]]]]) -> None:
        self.state = state
        self.scripts = scripts
        self.lists = 0
        self.watch_rvs: list[str] = []

    async def list(self, resource: str, **_: Any) -> tuple[list[dict[str, Any]], str]:
        self.lists += 1
        return list(self.state), str(max([int(o["metadata"]["resourceVersion"]) for o in self.state] or [1]))

    def watch(self, resource: str, namespace: str | None = None, resource_version: str = "") -> AsyncIterator[Any]:
        self.watch_rvs.append(resource_version)
        script = self.scripts.pop(0) if self.scripts else None

        async def gen() -> AsyncIterator[Any]:
            await asyncio.sleep(0.005)  # events arrive after the caller had a chance to run
            if script is None:
                await asyncio.Event().wait()  # idle forever
            for ev in script or ():
                yield ev
        return gen()


def run(reg: Scripted, inf: Informer, until: Any) -> None:
    async def main() -> None:
        t = asyncio.create_task(inf.run())
        for _ in range(200):
            await asyncio.sleep(0.001)
            if until():
                break
        t.cancel()
    asyncio.run(main())


def test_resume_from_last_rv_then_relist_on_error() -> None:
    reg = Scripted([obj("a", 1)], [
        [("ADDED", obj("b", 2, app="x"))],  # stream closed cleanly after this
        [("MODIFIED", obj("b", 3, app="y")), ("ERROR", {"code": 410, "message": "too old"})],
    ])
    inf = Informer(reg, "pods")  # type: ignore[arg-type]
    inf.add_index("app", lambda o: [o["metadata"]["labels"].get("app")] if o["metadata"]["labels"] else [])
    seen: list[tuple[str, str]] = []
    inf.add_handler(lambda o: seen.append(("add", o["metadata"]["name"])),
                    lambda old, new: seen.append(("update", new["metadata"]["name"])),
                    lambda o: seen.append(("delete", o["metadata"]["name"])))
    reg_state_after_error = [obj("b", 4, app="z")]  # "a" was deleted while we were not watching

    def until() -> bool:
        if reg.lists == 1 and not reg.scripts:
            reg.state = reg_state_after_error
        return reg.lists >= 2 and len(reg.watch_rvs) >= 3

    run(reg, inf, until)
    assert reg.watch_rvs[:2] == ["1", "2"]  # resumed from the last RV seen, no relist
    assert reg.lists == 2  # the ERROR forced one relist
    assert seen == [("add", "a"), ("add", "b"), ("update", "b"), ("delete", "a"), ("update", "b")]
    assert [o["metadata"]["name"] for o in inf.by_index("app", "z")] == ["b"]
    assert inf.by_index("app", "y") == [] and inf.get("ns", "a") is None


def test_own_writes_reach_other_handlers_only() -> None:
    reg = Scripted([], [[("ADDED", obj("s", 5)), ("MODIFIED", obj("s", 6)), ("DELETED", obj("s", 7))]])
    inf = Informer(reg, "endpointslices")  # type: ignore[arg-type]
    mine: list[str] = []
    theirs: list[str] = []
    inf.add_handler(lambda o: mine.append("add"), lambda a, b: mine.append("update"), lambda o: mine.append("delete"),
                    origin="me")
    inf.add_handler(lambda o: theirs.append("add"), lambda a, b: theirs.append("update"),
                    lambda o: theirs.append("delete"), origin="gc")

    async def main() -> None:
        t = asyncio.create_task(inf.run())
        await inf.synced.wait()
        inf.write_through(obj("s", 5), "me")  # as if "me" created it and got rv 5 back
        assert inf.get("ns", "s") is not None
        for _ in range(200):
            await asyncio.sleep(0.001)
            if len(theirs) >= 3:
                break
        t.cancel()

    asyncio.run(main())
    assert theirs == ["add", "update", "delete"]
    assert mine == ["update", "delete"]  # only the echo of its own create is suppressed


def test_forget_ignores_late_events_for_the_deleted_uid() -> None:
    reg = Scripted([obj("s", 1)], [[("MODIFIED", obj("s", 2)), ("DELETED", obj("s", 3)), ("ADDED", obj("s", 4, uid="new"))]])
    inf = Informer(reg, "endpointslices")  # type: ignore[arg-type]
    events: list[str] = []
    inf.add_handler(lambda o: events.append("add:" + o["metadata"]["uid"]), lambda a, b: events.append("update"),
                    lambda o: events.append("delete"), origin="me")

    async def main() -> None:
        t = asyncio.create_task(inf.run())
        await inf.synced.wait()
        inf.forget(obj("s", 1), "me")  # "me" deleted it before the watch caught up
        for _ in range(100):
            await asyncio.sleep(0.001)
        t.cancel()

    asyncio.run(main())
    assert events == ["add:u-s", "add:new"]  # no stale update/delete; the new incarnation arrives
    got = inf.get("ns", "s")
    assert got is not None and got["metadata"]["uid"] == "new"
