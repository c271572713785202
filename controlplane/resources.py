"""The table of kinds the apiserver serves: group/version/resource/kind, scope, names, verbs, subresources.

Everything else (discovery documents, URL routing, storage keys, OpenAPI stub, Table printers)
is derived from this table, so adding a kind is one entry here plus its defaulting/validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True, slots=True)
class Resource:
    group: str
    version: str
    resource: str  # plural, the URL segment
    kind: str
    singular: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS
    subresources: tuple[str, ...] = ()  # e.g. ("status", "binding")
    storage: str = ""  # storage resource name (shared by events in two groups); default = resource
    # subresources that only accept create (POST), e.g. pods/binding
    create_only_subresources: tuple[str, ...] = field(default=())

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def api_version(self) -> str:
        return self.group_version

    @property
    def list_kind(self) -> str:
        return self.kind + "List"

    @property
    def storage_resource(self) -> str:
        return self.storage or self.resource

    @property
    def qualified(self) -> str:
        """`services`, `endpointslices.discovery.k8s.io` — as used in error messages."""
        return f"{self.resource}.{self.group}" if self.group else self.resource

    def key(self, namespace: str, name: str) -> str:
        """Storage key, etcd-style (kube-apiserver layout)."""
        if self.namespaced:
            return f"/registry/{self.storage_resource}/{namespace}/{name}"
        return f"/registry/{self.storage_resource}/{name}"

    def prefix(self, namespace: str | None) -> str:
        """Key prefix for a list: one namespace, or all of them (namespace None/"")."""
        if self.namespaced and namespace:
            return f"/registry/{self.storage_resource}/{namespace}/"
        return f"/registry/{self.storage_resource}/"

    def base_path(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"


_STATUS = ("status",)

RESOURCES: tuple[Resource, ...] = (
    Resource("", "v1", "namespaces", "Namespace", "namespace", False, ("ns",), (), ALL_VERBS, ("status", "finalize")),
    Resource("", "v1", "nodes", "Node", "node", False, ("no",), (), ALL_VERBS, _STATUS),
    Resource(
        "", "v1", "pods", "Pod", "pod", True, ("po",), ("all",), ALL_VERBS, ("status", "binding"),
        create_only_subresources=("binding",),
    ),
    Resource("", "v1", "services", "Service", "service", True, ("svc",), ("all",), ALL_VERBS, _STATUS),
    Resource("", "v1", "events", "Event", "event", True, ("ev",), (), ALL_VERBS),
    Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", "endpointslice", True),
    # events.k8s.io/v1 Events share core v1 Events' storage (one object, two shapes, as kube-apiserver
    # does); controlplane/eventconv.py converts between the shapes.
    Resource("events.k8s.io", "v1", "events", "Event", "event", True, ("ev",), (), ALL_VERBS, storage="events"),
)

_BY_GVR: dict[tuple[str, str, str], Resource] = {(r.group, r.version, r.resource): r for r in RESOURCES}
_BY_KIND: dict[tuple[str, str], Resource] = {}
for _r in RESOURCES:
    _BY_KIND.setdefault((_r.group_version, _r.kind), _r)


def lookup(group: str, version: str, resource: str) -> Resource | None:
    return _BY_GVR.get((group, version, resource))


def by_name(resource: str, group: str = "") -> Resource:
    """In-process lookup for controllers: by plural name (and group when ambiguous)."""
    for r in RESOURCES:
        if r.resource == resource and r.group == group:
            return r
    for r in RESOURCES:
        if r.resource == resource:
            return r
    raise KeyError(resource)


def by_kind(api_version: str, kind: str) -> Resource | None:
    return _BY_KIND.get((api_version, kind))


def groups() -> list[tuple[str, list[str]]]:
    """[(group, [versions])] in first-seen order; the core group is ""."""
    seen: dict[str, list[str]] = {}
    for r in RESOURCES:
        vs = seen.setdefault(r.group, [])
        if r.version not in vs:
            vs.append(r.version)
    return list(seen.items())


def in_group_version(group: str, version: str) -> list[Resource]:
    return [r for r in RESOURCES if r.group == group and r.version == version]
