"""The cluster fixtures with a proxy: pods from the agents behind a Service, reached through
kpx proxy (iptables) from a pod and from the ext client. Proves the helpers other modules use."""

from __future__ import annotations

import pytest

from tests.integration.cluster_fixtures import unique_name

pytestmark = pytest.mark.netns


def test_pods_behind_clusterip_and_nodeport(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    c = cluster_factory("iptables")
    assert c.proxy_mode == "iptables" and "proxy iptables" in c.up_output
    app = unique_name("svc")
    pods = [unique_name("sp") for _ in range(2)]
    for name, node in zip(pods, ("node1", "node2"), strict=True):
        c.create_pod(name, node=node, labels={"app": app})
    for name in pods:
        c.wait_ready(name)
    svc = c.create_service(app, {"app": app}, [{"name": "tcp", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
                           type="NodePort")
    cip, node_port = svc["spec"]["clusterIP"], svc["spec"]["ports"][0]["nodePort"]
    seen = set()
    for _ in range(20):
        line = c.ask_from_pod(pods[0], "tcp", cip, 80, retry=10)
        assert line.startswith("pod="), line
        seen.add(line.split()[0][4:])
        if seen == set(pods):
            break
    assert seen == set(pods)  # both endpoints, on both nodes, answer through the ClusterIP
    for n in c.lab.nodes:
        line = c.ask_from_ext("tcp", n.ip, node_port, retry=10)
        assert line.split()[0][4:] in pods, line
    # the official client sees the same objects
    names = {p.metadata.name for p in c.core().list_namespaced_pod("default", label_selector=f"app={app}").items}
    assert names == set(pods)
