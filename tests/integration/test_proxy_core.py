"""The proxy core against the REAL `kpx apiserver` (HTTPS, token, CA from its kubeconfig), with a
recording mode that keeps every ProxyState it is asked to render.

Objects are written with the official `kubernetes` Python client. Covered: Service/EndpointSlice
-> model (merging, FQDN/headless/ExternalName/service-proxy-name ignored, ExternalName removal as
a partial sync), ApplyError -> full resync, apiserver killed and restarted with changes made
meanwhile (proxy keeps its state, then relists on 410 and converges), /metrics names,
/healthz + /livez semantics incl. node draining, healthCheckNodePort answers.

The recording mode never touches the kernel, and conntrack cleanup is off: nothing here changes
the host's network namespace. HTTP servers bind 127.0.0.1 random ports.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar

import pytest

from kpx.kubeclient import Backoff, KubeConfig
from proxy.config import ProxyOptions
from proxy.model import ProxyConfig, ProxyState, ServicePortName
from proxy.modes.base import ApplyError, Mode, Plan
from proxy.server import ProxyServer

pytestmark = pytest.mark.integration

T = TypeVar("T")


class RecordingMode(Mode[int]):
    name: ClassVar[str] = "iptables"

    def __init__(self, config: ProxyConfig) -> None:
        super().__init__(config)
        self.lock = threading.Lock()
        self.states: list[tuple[ProxyState, int | None]] = []
        self.fail = 0  # fail this many applies

    def render(self, state: ProxyState, prior: int | None) -> Plan[int]:
        with self.lock:
            self.states.append((state, prior))
            n = len(self.states)
        return Plan(full=state.full, payload=None, prior=n,
                    stats={"rules_nat": 3 * len(state.services), "rules_filter": 1})

    def apply(self, plan: Plan[int]) -> int:
        with self.lock:
            if self.fail:
                self.fail -= 1
                raise ApplyError("recording mode: told to fail")
        return plan.prior

    def last(self) -> ProxyState | None:
        with self.lock:
            return self.states[-1][0] if self.states else None


class ProxyThread:
    """A ProxyServer on its own event loop in a thread, so tests can use blocking clients."""

    def __init__(self, kubeconfig: str, node: str, *, sync_period: float = 30.0, min_sync_period: float = 0.05):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.opts = ProxyOptions(hostname_override=node, kubeconfig=kubeconfig, sync_period=sync_period,
                                 min_sync_period=min_sync_period, metrics_bind_address="127.0.0.1:0",
                                 healthz_bind_address="127.0.0.1:0")
        self.mode = RecordingMode(ProxyConfig(node_name=node, cluster_cidr="10.244.0.0/16"))

        async def make() -> ProxyServer:
            s = ProxyServer(self.opts, mode=self.mode, kubeconfig=KubeConfig.load(kubeconfig),
                            backoff=lambda: Backoff(0.05, 0.3), conntrack=False, health_check_bind=("127.0.0.1",))
            await s.start()
            return s

        self.server = self.run(make())

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def go() -> T:
            return fn()

        return self.run(go())  # type: ignore[no-any-return]

    def wait_for(self, what: str, pred: Callable[[], Any], timeout: float = 20.0, in_loop: bool = True) -> Any:
        """Poll `pred` (on the proxy's loop, or in this thread for blocking HTTP checks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.call(pred) if in_loop else pred()
            if v:
                return v
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last state: {self.mode.last()}")

    def http(self, which: str, path: str) -> tuple[int, str, dict[str, str]]:
        host, port = self.server.metrics_address if which == "metrics" else self.server.healthz_address
        return http_get(f"http://{host}:{port}{path}")

    def stop(self) -> None:
        try:
            self.run(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def http_get(url: str) -> tuple[int, str, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def api(apiserver: Any) -> Iterator[Any]:
    from kubernetes import client, config

    c = config.new_client_from_config(config_file=str(apiserver.kubeconfig))
    try:
        yield client.CoreV1Api(c), client.DiscoveryV1Api(c)
    finally:
        c.close()


def ns_create(core: Any, name: str) -> None:
    core.create_namespace({"metadata": {"name": name}})


def svc_body(name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("ports", [{"name": "http", "port": 80, "protocol": "TCP"}])
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": spec.pop("labels", {})},
            "spec": spec}


def slice_body(name: str, service: str, eps: list[dict[str, Any]], ports: list[dict[str, Any]],
               address_type: str = "IPv4") -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service},
                         "annotations": {"endpoints.kubernetes.io/last-change-trigger-time":
                                         time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}},
            "addressType": address_type, "endpoints": eps, "ports": ports}


def ep(ip: str, node: str = "n1", ready: bool = True, serving: bool = True, terminating: bool = False) -> dict[str, Any]:
    return {"addresses": [ip], "nodeName": node,
            "conditions": {"ready": ready, "serving": serving, "terminating": terminating}}


def spns(state: ProxyState | None, ns: str) -> set[ServicePortName]:
    return {s for s in (state.services if state else {}) if s.namespace == ns}


def test_model_follows_the_apiserver(apiserver: Any, api: Any) -> None:
    core, disc = api
    ns = uniq("pc")
    ns_create(core, ns)
    node = uniq("node")
    p = ProxyThread(str(apiserver.kubeconfig), node)
    try:
        core.create_namespaced_service(ns, svc_body(
            "web", sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
            internalTrafficPolicy="Local",
            ports=[{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]))
        core.create_namespaced_service(ns, svc_body("np", type="NodePort"))
        lb = core.create_namespaced_service(ns, svc_body("lb", type="LoadBalancer", externalTrafficPolicy="Local",
                                                         loadBalancerSourceRanges=["203.0.113.0/24"]))
        core.patch_namespaced_service_status("lb", ns, {"status": {"loadBalancer": {"ingress": [
            {"ip": "192.0.2.10"}, {"ip": "192.0.2.11", "ipMode": "Proxy"}]}}})
        core.create_namespaced_service(ns, svc_body("headless", clusterIP="None"))
        core.create_namespaced_service(ns, svc_body("ext", type="ExternalName", externalName="example.com"))
        core.create_namespaced_service(ns, svc_body(
            "other", labels={"service.kubernetes.io/service-proxy-name": "someone-else"}))
        web_ports = [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}]
        disc.create_namespaced_endpoint_slice(ns, slice_body("web-a", "web", [
            ep("10.244.1.2", node), ep("10.244.2.2", "other-node")], web_ports))
        disc.create_namespaced_endpoint_slice(ns, slice_body("web-b", "web", [
            ep("10.244.1.2", node), ep("10.244.1.3", node, ready=False, terminating=True)], web_ports))
        disc.create_namespaced_endpoint_slice(ns, slice_body("web-fqdn", "web", [
            {"addresses": ["web.example.com"]}], web_ports, address_type="FQDN"))
        disc.create_namespaced_endpoint_slice(ns, slice_body("lb-a", "lb", [ep("10.244.1.9", node)],
                                                             [{"name": "http", "port": 8080, "protocol": "TCP"}]))
        http = ServicePortName(ns, "web", "http", "TCP")
        dns = ServicePortName(ns, "web", "dns", "UDP")
        lbp = ServicePortName(ns, "lb", "http", "TCP")

        def converged() -> bool:
            st = p.mode.last()
            return bool(st and len(st.endpoints.get(http, ())) == 3 and st.endpoints.get(lbp)
                        and st.services.get(lbp) and st.services[lbp].load_balancer_ips)

        p.wait_for("web's 3 endpoints and lb's ingress IP", converged)
        st = p.mode.last()
        assert st is not None
        assert spns(st, ns) == {http, dns, ServicePortName(ns, "np", "http", "TCP"), lbp}  # ignored ones absent
        web = st.services[http]
        assert web.affinity_timeout == 60 and web.internal_policy_local and web.cluster_ip
        assert st.services[dns].protocol == "UDP" and st.services[dns].port == 53
        assert [(e.ip, e.port, e.ready, e.terminating) for e in st.endpoints[dns]] == [
            ("10.244.1.2", 5353, True, False), ("10.244.1.3", 5353, False, True), ("10.244.2.2", 5353, True, False)]
        assert st.services[ServicePortName(ns, "np", "http", "TCP")].node_port >= 30000
        lbs = st.services[lbp]
        assert lbs.load_balancer_ips == ("192.0.2.10",) and lbs.external_policy_local
        assert lbs.load_balancer_source_ranges == ("203.0.113.0/24",)
        assert lbs.health_check_node_port == lb.spec.health_check_node_port > 0

        # healthCheckNodePort server: 1 ready local endpoint
        code, body, headers = http_get(f"http://127.0.0.1:{lbs.health_check_node_port}/")
        assert code == 200 and headers["X-Load-Balancing-Endpoint-Weight"] == "1"
        assert json.loads(body) == {"service": {"namespace": ns, "name": "lb"}, "localEndpoints": 1,
                                    "serviceProxyHealthy": True}

        # web becomes ExternalName: its rules must go, in a partial sync naming its ports
        n_before = len(p.mode.states)
        core.patch_namespaced_service("web", ns, [
            {"op": "replace", "path": "/spec/type", "value": "ExternalName"},
            {"op": "add", "path": "/spec/externalName", "value": "example.com"},
            {"op": "remove", "path": "/spec/clusterIP"}, {"op": "remove", "path": "/spec/clusterIPs"},
            {"op": "remove", "path": "/spec/sessionAffinityConfig"},
            {"op": "replace", "path": "/spec/sessionAffinity", "value": "None"},
        ])
        p.wait_for("web removed", lambda: http not in p.mode.last().services)  # type: ignore[union-attr]
        st = p.mode.last()
        assert st is not None and not st.full and {http, dns} <= (st.changed or set())
        assert len(p.mode.states) > n_before and http not in st.endpoints

        # lb scales to zero local endpoints: the health check says 503
        disc.delete_namespaced_endpoint_slice("lb-a", ns)
        p.wait_for("lb endpoints gone", lambda: lbp not in p.mode.last().endpoints)  # type: ignore[union-attr]
        code, body, headers = http_get(f"http://127.0.0.1:{lbs.health_check_node_port}/")
        assert code == 503 and json.loads(body)["localEndpoints"] == 0
    finally:
        p.stop()
        core.delete_namespace(ns)


def test_apply_error_forces_a_full_resync_and_health_goes_stale(apiserver: Any, api: Any) -> None:
    core, _ = api
    ns = uniq("pf")
    ns_create(core, ns)
    p = ProxyThread(str(apiserver.kubeconfig), uniq("node"), sync_period=1.0)
    try:
        p.wait_for("first sync", lambda: p.server.syncer.syncs["full"] >= 1)
        p.mode.fail = 1_000_000  # the kernel refuses everything from now on
        core.create_namespaced_service(ns, svc_body("a"))
        p.wait_for("a failed sync", lambda: p.server.syncer.syncs["failed"] >= 1)
        # pending changes not programmed for > 2 x syncPeriod: unhealthy
        p.wait_for("livez 503", lambda: p.http("healthz", "/livez")[0] == 503, timeout=10, in_loop=False)
        assert p.http("healthz", "/healthz")[0] == 503
        _, metrics, _ = p.http("metrics", "/metrics")
        assert "kubeproxy_sync_proxy_rules_iptables_restore_failures_total" in metrics
        p.mode.fail = 0
        # retried after syncPeriod as a full sync with no prior
        p.wait_for("recovery", lambda: p.server.syncer.last_error is None and p.server.syncer.syncs["failed"])
        st, prior = p.mode.states[-1]
        assert st.full and prior is None and ServicePortName(ns, "a", "http") in st.services
        p.wait_for("healthz 200", lambda: p.http("healthz", "/healthz")[0] == 200, in_loop=False)
    finally:
        p.stop()
        core.delete_namespace(ns)


def test_metrics_names_and_node_draining(apiserver: Any, api: Any) -> None:
    core, disc = api
    ns = uniq("pm")
    ns_create(core, ns)
    node = uniq("node")
    p = ProxyThread(str(apiserver.kubeconfig), node)
    try:
        core.create_namespaced_service(ns, svc_body("m"))
        disc.create_namespaced_endpoint_slice(ns, slice_body("m-1", "m", [ep("10.244.1.4", node)],
                                                             [{"name": "http", "port": 8080, "protocol": "TCP"}]))
        spn = ServicePortName(ns, "m", "http")
        p.wait_for("m's endpoint", lambda: p.mode.last() and p.mode.last().endpoints.get(spn))  # type: ignore[union-attr]
        code, text, headers = p.http("metrics", "/metrics")
        assert code == 200 and headers["Content-Type"].startswith("text/plain")
        for name in ("kubeproxy_sync_proxy_rules_duration_seconds_bucket",
                     "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
                     "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
                     "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                     "kubeproxy_network_programming_duration_seconds_bucket",
                     "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                     "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                     "kubeproxy_sync_proxy_rules_service_changes_pending",
                     "kubeproxy_sync_proxy_rules_service_changes_total",
                     "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
                     "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
                     'kubeproxy_sync_proxy_rules_iptables_total{table="nat"}',
                     'kubeproxy_sync_proxy_rules_iptables_last{table="nat"}',
                     'kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy="internal"}',
                     "kubeproxy_conntrack_reconciler_deleted_entries_total"):
            assert name in text, name
        assert 'kubeproxy_network_programming_duration_seconds_bucket{le="0.25"}' in text
        assert 'kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="0.001"}' in text
        assert p.http("metrics", "/proxyMode")[1] == "iptables"
        code, body, _ = p.http("healthz", "/healthz")
        doc = json.loads(body)
        assert code == 200 and doc["nodeEligible"] is True and doc["lastUpdated"].endswith("UTC")
        # the node gets the autoscaler's deletion taint: /healthz drains, /livez stays up
        core.create_node({"metadata": {"name": node}, "spec": {"taints": [
            {"key": "ToBeDeletedByClusterAutoscaler", "value": "1", "effect": "NoSchedule"}]}})
        p.wait_for("healthz 503", lambda: p.http("healthz", "/healthz")[0] == 503, in_loop=False)
        assert json.loads(p.http("healthz", "/healthz")[1])["nodeEligible"] is False
        assert p.http("healthz", "/livez")[0] == 200
        core.delete_node(node)
    finally:
        p.stop()
        core.delete_namespace(ns)


def test_apiserver_restart_keeps_state_then_relists(apiserver_factory: Any, tmp_path: Any) -> None:
    from kubernetes import client, config

    srv = apiserver_factory(name="main")
    data_dir, port = srv.data_dir, srv.port
    kubeconfig = str(tmp_path / "proxy.kubeconfig")
    (tmp_path / "proxy.kubeconfig").write_text(srv.kubeconfig.read_text())  # keep the main port

    def core_for(kc: str) -> Any:
        return client.CoreV1Api(config.new_client_from_config(config_file=kc))

    core = core_for(kubeconfig)
    core.create_namespace({"metadata": {"name": "r"}})
    core.create_namespaced_service("r", svc_body("a"))
    p = ProxyThread(kubeconfig, uniq("node"))
    a, b = ServicePortName("r", "a", "http"), ServicePortName("r", "b", "http")
    try:
        p.wait_for("a programmed", lambda: a in spns(p.mode.last(), "r"))
        relists = p.call(lambda: p.server.informers["services"].relists)
        n_states = len(p.mode.states)
        srv.stop()  # SIGTERM; the proxy's watches break
        p.wait_for("informer notices", lambda: not p.server.informers["services"].connected)
        time.sleep(1.0)
        # nothing was re-rendered from an empty store; the data plane is left as it was
        assert all(a in st.services for st, _ in p.mode.states[n_states:])
        assert p.http("metrics", "/metrics")[0] == 200
        # changes happen while "our" apiserver is away (another process on the same data dir)
        other = apiserver_factory(name="other", data_dir=data_dir)
        oc = core_for(str(other.kubeconfig))
        oc.delete_namespaced_service("a", "r")
        oc.create_namespaced_service("r", svc_body("b"))
        other.stop()
        # back on the original port: its watch cache starts now, so the old RV is 410 -> relist
        apiserver_factory(name="main2", data_dir=data_dir, port=port)
        p.wait_for("relisted to b only", lambda: spns(p.mode.last(), "r") == {b}, timeout=30)
        assert p.call(lambda: p.server.informers["services"].relists) > relists
    finally:
        p.stop()
