"""Capture the PATCH bodies real kubectl binaries send, into kubectl_payloads.json beside this file.

    .venv/bin/python tests/unit/data/capture_kubectl_payloads.py

A tiny recorder on a random 127.0.0.1 port serves legacy discovery and a "live" object per
scenario; kubectl (client-side apply, server-side apply, label, patch) computes its patch against
it and the recorder keeps the Content-Type and body. test_patch.py / test_ssa.py replay them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
HERE = Path(__file__).parent
KUBECTLS = {"1.27": "/usr/lib/google-cloud-sdk/bin/kubectl.1.27", "1.33": "/usr/lib/google-cloud-sdk/bin/kubectl.1.33"}
LAST = "kubectl.kubernetes.io/last-applied-configuration"

RES: dict[str, dict[str, Any]] = {
    "services": {"kind": "Service", "shortNames": ["svc"]},
    "pods": {"kind": "Pod", "shortNames": ["po"]},
    "namespaces": {"kind": "Namespace", "shortNames": ["ns"], "namespaced": False},
    "nodes": {"kind": "Node", "shortNames": ["no"], "namespaced": False},
}

SVC_V1 = {"apiVersion": "v1", "kind": "Service",
          "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web", "tier": "old"}},
          "spec": {"selector": {"app": "web"}, "ports": [
              {"name": "http", "port": 80, "targetPort": 8080},
              {"name": "https", "port": 443, "targetPort": 8443},
              {"name": "dns", "port": 53, "protocol": "UDP"}]}}
SVC_V2 = {"apiVersion": "v1", "kind": "Service",
          "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web", "team": "net"}},
          "spec": {"type": "NodePort", "selector": {"app": "web", "v": "2"}, "ports": [
              {"name": "metrics", "port": 9090},
              {"name": "http", "port": 80, "targetPort": 8081},
              {"name": "dns", "port": 53, "protocol": "UDP"}]}}
POD_V1 = {"apiVersion": "v1", "kind": "Pod",
          "metadata": {"name": "p1", "namespace": "default", "finalizers": ["example.com/a", "example.com/b"]},
          "spec": {"containers": [
              {"name": "app", "image": "kpx/echo:1", "ports": [{"containerPort": 8080}, {"containerPort": 9000}],
               "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
               "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
              {"name": "side", "image": "kpx/http:1"}],
              "volumes": [{"name": "data", "emptyDir": {}}],
              "tolerations": [{"key": "a", "operator": "Exists"}]}}
POD_V2 = {"apiVersion": "v1", "kind": "Pod",
          "metadata": {"name": "p1", "namespace": "default", "finalizers": ["example.com/b"]},
          "spec": {"containers": [
              {"name": "app", "image": "kpx/echo:2", "ports": [{"containerPort": 8080}],
               "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}],
               "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
              "volumes": [{"name": "data", "hostPath": {"path": "/tmp/x"}}],
              "tolerations": [{"key": "b", "operator": "Exists"}]}}


def _live(manifest: dict[str, Any], server_fields: bool = True) -> dict[str, Any]:
    live = json.loads(json.dumps(manifest))
    last = json.dumps({**manifest, "metadata": {**manifest["metadata"], "annotations": {}}}, sort_keys=True,
                      separators=(",", ":")) + "\n"
    live["metadata"].setdefault("annotations", {})[LAST] = last
    live["metadata"].update(uid="u-1", resourceVersion="10", creationTimestamp="2026-01-01T00:00:00Z")
    if server_fields and manifest["kind"] == "Service":
        live["spec"].update(clusterIP="10.96.0.50", clusterIPs=["10.96.0.50"], type=live["spec"].get("type", "ClusterIP"),
                            sessionAffinity="None")
        for p in live["spec"]["ports"]:
            p.setdefault("protocol", "TCP")
            p.setdefault("targetPort", p["port"])
    return live


def _csa_managed(live: dict[str, Any]) -> dict[str, Any]:
    """A live object as kpx stores it after `kubectl apply` (client-side): one Update entry."""
    from controlplane.ssa import record_update

    out = json.loads(json.dumps(live))
    record_update(None, out, "kubectl-client-side-apply", operation="Update", api_version="v1")
    return out


class Recorder(BaseHTTPRequestHandler):
    live: dict[str, Any] | None = None
    seen: list[dict[str, Any]] = []

    def log_message(self, *a: Any) -> None:
        pass

    def _send(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/version":
            return self._send(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"})
        if path == "/api":
            return self._send(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})
        if path == "/apis":
            return self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
        if path == "/api/v1":
            return self._send(200, {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
                {"name": n, "singularName": n[:-1], "namespaced": r.get("namespaced", True), "kind": r["kind"],
                 "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"], "shortNames": r["shortNames"]}
                for n, r in RES.items()]})
        if self.live is not None and path.endswith("/" + self.live["metadata"]["name"]):
            return self._send(200, self.live)
        return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                "code": 404, "message": "not found"})

    def do_PATCH(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n).decode()
        self.seen.append({"path": self.path, "content_type": self.headers.get("Content-Type"), "body": body})
        return self._send(200, self.live)


def run(kubectl: str, port: int, args: list[str], manifest: dict[str, Any] | None) -> None:
    with tempfile.TemporaryDirectory() as d:
        kc = Path(d, "kubeconfig")
        kc.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": "default"}}],
            "users": [{"name": "u", "user": {}}]}))
        if manifest is not None:
            Path(d, "m.yaml").write_text(yaml.safe_dump(manifest))
            args = [a.replace("@M", str(Path(d, "m.yaml"))) for a in args]
        subprocess.run([kubectl, "--kubeconfig", str(kc), "--cache-dir", str(Path(d, "cache")), *args],
                       capture_output=True, timeout=60, check=False)


def main() -> int:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    srv.server_bind = lambda: ThreadingHTTPServer.server_bind(srv)  # type: ignore[method-assign]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    scenarios = {
        "csa_service": (_live(SVC_V1), SVC_V2, ["apply", "--validate=false", "-f", "@M"]),
        "csa_pod": (_live(POD_V1), POD_V2, ["apply", "--validate=false", "-f", "@M"]),
        "ssa_service": (_live(SVC_V1), SVC_V2,
                        ["apply", "--server-side", "--validate=false", "-f", "@M"]),
        "ssa_service_force": (_live(SVC_V1), SVC_V2,
                              ["apply", "--server-side", "--force-conflicts", "--validate=false", "-f", "@M"]),
        # kubectl >= 1.26 first migrates client-side-apply ownership to its SSA manager (csaupgrade)
        "ssa_migrate_service": (_csa_managed(_live(SVC_V1)), SVC_V1,
                                ["apply", "--server-side", "--validate=false", "-f", "@M"]),
        "label_service": (_live(SVC_V1), None, ["label", "svc", "web", "tier-", "team=net"]),
        "patch_service_smp": (_live(SVC_V1), None,
                              ["patch", "svc", "web", "-p", '{"spec":{"ports":[{"port":443,"$patch":"delete"}]}}']),
    }
    out: dict[str, Any] = {}
    for ver, kubectl in KUBECTLS.items():
        for name, (live, manifest, args) in scenarios.items():
            Recorder.live, Recorder.seen = live, []
            run(kubectl, port, args, manifest)
            patches = list(Recorder.seen)
            if not patches:
                print(f"{ver} {name}: kubectl sent no PATCH", file=sys.stderr)
                return 1
            # the first PATCH is the one computed from the manifest; later ones (if any) are follow-ups
            out[f"{name}@{ver}"] = {"live": live, "manifest": manifest, "args": args, **patches[0],
                                    "followups": patches[1:]}
    srv.shutdown()
    (HERE / "kubectl_payloads.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"captured {len(out)} payloads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
