"""`kpx up --demo` (`sudo make demo`): a small app on the lab, and visible proof that it works.

    3 kpx/echo pods (app=echo), spread over the nodes by the scheduler
    Service echo          ClusterIP  port 80 -> 8080 (TCP and UDP)
    Service echo-nodeport NodePort   port 80 -> 8080, nodePort 30080

Proofs printed one per line, each with what answered (the echo line names the pod and the
client address it saw): pod -> pod on another node (TCP and UDP via pod IPs from the
apiserver), and with a proxy running: pod -> ClusterIP, ext client -> NodePort on each node.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from typing import Any

from kpx.errors import UserError
from netns import ns
from netns.lab import DEFAULT_LAB, Lab

NAMESPACE = "default"
APP = "echo"
REPLICAS = 3
NODE_PORT = 30080


def pod_manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": APP}},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "echo",
                "image": "kpx/echo",
                "ports": [{"name": "echo", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "echo-udp", "containerPort": 8080, "protocol": "UDP"}],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 2},
            }],
        },
    }


def service_manifest(name: str, typ: str) -> dict[str, Any]:
    ports: list[dict[str, Any]] = [{"name": "tcp", "protocol": "TCP", "port": 80, "targetPort": 8080},
                                   {"name": "udp", "protocol": "UDP", "port": 80, "targetPort": 8080}]
    if typ == "NodePort":
        ports[0]["nodePort"] = NODE_PORT
        ports[1]["nodePort"] = NODE_PORT
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"type": typ, "selector": {"app": APP}, "ports": ports}}


# --------------------------------------------------------------------------- probes


def ask(netns: str, proto: str, ip: str, port: int, timeout: float = 2.0) -> str:
    """One request line (TCP) or datagram (UDP) from inside netns; the answer line, or 'ERROR ...'."""

    def go() -> str:
        try:
            if proto == "tcp":
                with socket.create_connection((ip, port), timeout=timeout) as s:
                    s.sendall(b"hello\n")
                    buf = b""
                    while not buf.endswith(b"\n"):
                        d = s.recv(4096)
                        if not d:
                            break
                        buf += d
                    return buf.decode(errors="replace").strip() or "ERROR empty answer"
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                s.sendto(b"hello\n", (ip, port))
                return s.recv(4096).decode(errors="replace").strip()
        except OSError as e:
            return f"ERROR {e.strerror or type(e).__name__}"

    return ns.in_netns(netns, go)


def ask_retry(netns: str, proto: str, ip: str, port: int, within: float = 10.0) -> str:
    """ask() until it answers (a Service takes a moment to be programmed)."""
    deadline = time.monotonic() + within
    while True:
        out = ask(netns, proto, ip, port)
        if not out.startswith("ERROR") or time.monotonic() > deadline:
            return out
        time.sleep(0.3)


# --------------------------------------------------------------------------- apply + wait


async def _deploy(kubeconfig: str, timeout: float) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    from kpx.kubeclient import ApiError, KubeClient, KubeConfig

    async with KubeClient(KubeConfig.load(kubeconfig)) as kc:
        base = f"/api/v1/namespaces/{NAMESPACE}"
        for i in range(1, REPLICAS + 1):
            try:
                await kc.create(f"{base}/pods", pod_manifest(f"{APP}-{i}"))
            except ApiError as e:
                if e.code != 409:
                    raise
        svcs = {}
        for name, typ in ((APP, "ClusterIP"), (f"{APP}-nodeport", "NodePort")):
            try:
                svcs[name] = await kc.create(f"{base}/services", service_manifest(name, typ))
            except ApiError as e:
                if e.code != 409:
                    raise
                svcs[name] = await kc.get(f"{base}/services/{name}")
        deadline = time.monotonic() + timeout
        while True:
            pods = (await kc.list(f"{base}/pods", label_selector=f"app={APP}")).get("items") or []
            ready = [p for p in pods if any(c.get("type") == "Ready" and c.get("status") == "True"
                                            for c in (p.get("status") or {}).get("conditions") or [])]
            if len(ready) >= REPLICAS:
                return sorted(ready, key=lambda p: p["metadata"]["name"]), svcs[APP], svcs[f"{APP}-nodeport"]
            if time.monotonic() > deadline:
                raise UserError(f"demo pods not Ready after {timeout:.0f}s ({len(ready)}/{REPLICAS}): "
                                f"kubectl get pods -o wide")
            await asyncio.sleep(0.2)


def _line(ok: bool, what: str, answer: str) -> bool:
    mark = "OK  " if ok else "FAIL"
    print(f"  {mark} {what:<64} {answer}")
    return ok


def run(lab: Lab, timeout: float = 60.0) -> int:
    from netns.up import UpState, kubeconfig_path

    st = UpState.load(lab)
    print(f"kpx demo: deploying {REPLICAS} kpx/echo pods, Service {APP} (ClusterIP) and {APP}-nodeport "
          f"(NodePort {NODE_PORT}) ...")
    pods, svc, nodeport = asyncio.run(_deploy(str(kubeconfig_path(lab)), timeout))
    for p in pods:
        print(f"  pod {p['metadata']['name']:<8} node {p['spec']['nodeName']:<6} ip {p['status']['podIP']}")
    by_node: dict[str, dict[str, Any]] = {}
    for p in pods:
        by_node.setdefault(p["spec"]["nodeName"], p)
    src = pods[0]
    src_netns = lab.pod_netns(NAMESPACE, src["metadata"]["name"])
    others = [p for p in pods if p["spec"]["nodeName"] != src["spec"]["nodeName"]] or pods[1:]
    dst = others[0]
    ok = True
    sname, dname = src["metadata"]["name"], dst["metadata"]["name"]
    where = "across nodes" if dst["spec"]["nodeName"] != src["spec"]["nodeName"] else "same node"
    print(f"pod-to-pod ({where}: {src['spec']['nodeName']} -> {dst['spec']['nodeName']}):")
    for proto in ("tcp", "udp"):
        ans = ask_retry(src_netns, proto, dst["status"]["podIP"], 8080, within=5)
        ok &= _line(f"pod={dname}" in ans, f"{sname} -> {dname} {dst['status']['podIP']}:8080/{proto}", ans)
    cip = svc["spec"].get("clusterIP")
    if st and st.proxy_mode:
        print(f"Services (kpx proxy --proxy-mode {st.proxy_mode}):")
        for proto in ("tcp", "udp"):
            ans = ask_retry(src_netns, proto, cip, 80)
            ok &= _line(f"pod={APP}-" in ans, f"{sname} -> ClusterIP {APP} {cip}:80/{proto}", ans)
        for n in lab.nodes:
            ans = ask_retry(lab.ext_netns, "tcp", n.ip, NODE_PORT)
            ok &= _line(f"pod={APP}-" in ans, f"ext {lab.ext_ip} -> NodePort {n.name} {n.ip}:{NODE_PORT}/tcp", ans)
    else:
        print(f"Services: ClusterIP {APP} {cip}:80 and NodePort {NODE_PORT} are created, but no proxy runs "
              f"(kpx up --proxy-mode iptables ...) so nothing answers on them yet.")
    flag = "" if lab.name == DEFAULT_LAB else f" --lab {lab.name}"
    print(f"kpx demo: {'all checks passed' if ok else 'SOME CHECKS FAILED'}; the lab stays up. Try:")
    print(f"  kpx exec{flag} pod/{NAMESPACE}/{sname} -- python3 -c \"import socket; s=socket.create_connection"
          f"(('{cip}', 80)); s.sendall(b'hi\\n'); print(s.recv(99))\"")
    print(f"  kubectl get pods,svc,endpointslices -o wide;  kpx down{flag}   # remove it")
    sys.stdout.flush()
    return 0 if ok else 1
