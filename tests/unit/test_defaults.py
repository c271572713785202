import pytest

from controlplane.defaults import apply_defaults

pytestmark = pytest.mark.unit


def svc(**spec):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x", "namespace": "default"}, "spec": spec}


def test_service_clusterip_defaults_like_kube_apiserver():
    s = svc(ports=[{"port": 80}], selector={"app": "x"})
    apply_defaults("Service", s)
    assert s["spec"] == {
        "ports": [{"port": 80, "protocol": "TCP", "targetPort": 80}],
        "selector": {"app": "x"},
        "type": "ClusterIP",
        "sessionAffinity": "None",
        "internalTrafficPolicy": "Cluster",
        "ipFamilyPolicy": "SingleStack",
        "ipFamilies": ["IPv4"],
    }
    assert s["status"] == {"loadBalancer": {}}


def test_named_target_port_kept():
    s = svc(ports=[{"port": 80, "targetPort": "http"}])
    apply_defaults("Service", s)
    assert s["spec"]["ports"][0]["targetPort"] == "http"


def test_nodeport_and_lb_get_external_policy_lb_gets_node_port_allocation_flag():
    n = svc(type="NodePort", ports=[{"port": 80}])
    apply_defaults("Service", n)
    assert n["spec"]["externalTrafficPolicy"] == "Cluster"
    assert "allocateLoadBalancerNodePorts" not in n["spec"]
    lb = svc(type="LoadBalancer", ports=[{"port": 80}], externalTrafficPolicy="Local")
    apply_defaults("Service", lb)
    assert lb["spec"]["externalTrafficPolicy"] == "Local"
    assert lb["spec"]["allocateLoadBalancerNodePorts"] is True


def test_client_ip_affinity_timeout():
    s = svc(ports=[{"port": 80}], sessionAffinity="ClientIP")
    apply_defaults("Service", s)
    assert s["spec"]["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 10800}}


def test_external_name_has_no_families_or_itp():
    s = svc(type="ExternalName", externalName="db.example.com")
    apply_defaults("Service", s)
    for k in ("ipFamilies", "ipFamilyPolicy", "internalTrafficPolicy", "clusterIP"):
        assert k not in s["spec"]


def test_headless_selectorless_is_require_dual_stack():
    s = svc(clusterIP="None", ports=[{"port": 80}])
    apply_defaults("Service", s)
    assert s["spec"]["clusterIPs"] == ["None"]
    assert s["spec"]["ipFamilyPolicy"] == "RequireDualStack"
    assert s["spec"]["ipFamilies"] == ["IPv4", "IPv6"]
    h = svc(clusterIP="None", ports=[{"port": 80}], selector={"a": "b"})
    apply_defaults("Service", h)
    assert h["spec"]["ipFamilyPolicy"] == "SingleStack" and h["spec"]["ipFamilies"] == ["IPv4"]


def test_cluster_ips_mirror_and_family_from_ip():
    s = svc(clusterIPs=["fd00::10"], ports=[{"port": 80}])
    apply_defaults("Service", s, ip_family="IPv6")
    assert s["spec"]["clusterIP"] == "fd00::10" and s["spec"]["ipFamilies"] == ["IPv6"]


def test_update_keeps_status():
    s = svc(ports=[{"port": 80}])
    s["status"] = {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}
    apply_defaults("Service", s, create=False)
    assert s["status"]["loadBalancer"]["ingress"] == [{"ip": "1.2.3.4"}]


def test_pod_defaults():
    p = {"metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "a", "image": "kpx/echo", "ports": [{"containerPort": 8080}],
         "readinessProbe": {"httpGet": {"port": 8080}}},
        {"name": "b", "image": "nginx:1.25", "resources": {"limits": {"cpu": "1"}}},
        {"name": "c", "image": "busybox@sha256:abc"},
    ]}, "status": {"phase": "Running"}}
    apply_defaults("Pod", p)
    s = p["spec"]
    assert (s["restartPolicy"], s["dnsPolicy"], s["schedulerName"]) == ("Always", "ClusterFirst", "default-scheduler")
    assert s["terminationGracePeriodSeconds"] == 30 and s["enableServiceLinks"] is True and s["securityContext"] == {}
    a, b, c = s["containers"]
    assert a["imagePullPolicy"] == "Always" and b["imagePullPolicy"] == "IfNotPresent"
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert a["terminationMessagePath"] == "/dev/termination-log" and a["terminationMessagePolicy"] == "File"
    assert a["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert a["readinessProbe"] == {"httpGet": {"port": 8080, "scheme": "HTTP", "path": "/"}, "timeoutSeconds": 1,
                                   "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3}
    assert b["resources"] == {"limits": {"cpu": "1"}, "requests": {"cpu": "1"}}
    assert p["status"] == {"phase": "Pending", "qosClass": "Burstable"}
    # default admission plugins: Priority and DefaultTolerationSeconds
    assert s["priority"] == 0 and s["preemptionPolicy"] == "PreemptLowerPriority"
    assert s["tolerations"] == [
        {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]


def test_pod_own_tolerations_kept_and_not_duplicated():
    tol = {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5}
    p = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a", "image": "x:1"}], "tolerations": [tol]}}
    apply_defaults("Pod", p)
    assert [t["key"] for t in p["spec"]["tolerations"]] == ["node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready"]
    assert p["spec"]["tolerations"][0]["tolerationSeconds"] == 5
    everything = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a", "image": "x:1"}],
                                                       "tolerations": [{"operator": "Exists"}]}}
    apply_defaults("Pod", everything)
    assert everything["spec"]["tolerations"] == [{"operator": "Exists"}]


def test_pod_host_network_host_ports_and_best_effort():
    p = {"metadata": {"name": "p"}, "spec": {"hostNetwork": True, "containers": [
        {"name": "a", "image": "x:1", "ports": [{"containerPort": 53, "protocol": "UDP"}]}]}}
    apply_defaults("Pod", p)
    assert p["spec"]["containers"][0]["ports"][0] == {"containerPort": 53, "protocol": "UDP", "hostPort": 53}
    assert p["status"]["qosClass"] == "BestEffort"


def test_pod_update_does_not_reset_status():
    p = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a", "image": "x:1"}]},
         "status": {"phase": "Running"}}
    apply_defaults("Pod", p, create=False)
    assert p["status"] == {"phase": "Running"}


def test_namespace_defaults():
    ns = {"metadata": {"name": "team-a"}, "spec": {"finalizers": ["example.com/x"]}}
    apply_defaults("Namespace", ns)
    assert ns["metadata"]["labels"] == {"kubernetes.io/metadata.name": "team-a"}
    assert ns["spec"]["finalizers"] == ["example.com/x", "kubernetes"]
    assert ns["status"] == {"phase": "Active"}
    upd = {"metadata": {"name": "team-a", "labels": {"kubernetes.io/metadata.name": "evil"}}, "spec": {"finalizers": []},
           "status": {"phase": "Terminating"}}
    apply_defaults("Namespace", upd, create=False)
    assert upd["metadata"]["labels"]["kubernetes.io/metadata.name"] == "team-a"
    assert upd["spec"]["finalizers"] == [] and upd["status"]["phase"] == "Terminating"


def test_endpointslice_and_node_defaults():
    es = {"metadata": {"name": "x-1"}, "addressType": "IPv4", "ports": [{"port": 80}]}
    apply_defaults("EndpointSlice", es)
    assert es["ports"] == [{"port": 80, "protocol": "TCP", "name": ""}]
    assert "endpoints" in es and es["endpoints"] is None
    n = {"metadata": {"name": "n1"}, "status": {"capacity": {"cpu": "2", "pods": "110"}}}
    apply_defaults("Node", n)
    assert n["status"]["allocatable"] == {"cpu": "2", "pods": "110"} and n["spec"] == {}


def test_unknown_kind_untouched():
    o = {"metadata": {"name": "e"}}
    apply_defaults("Event", o)
    assert o == {"metadata": {"name": "e"}}
