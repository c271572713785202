"""`kpx apiserver` as a command: one-line errors for bad flags / unusable data dirs / a taken port,
credentials generated on first start and kept, clean exit on SIGTERM, state kept across restarts."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

pytestmark = pytest.mark.integration


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kpx", "apiserver", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("flags,needle", [
    (["--secure-port", "70000"], "--secure-port"),
    (["--bind-address", "not-an-ip"], "not an IP address"),
    (["--service-cluster-ip-range", "10.96.0.0/33"], "--service-cluster-ip-range"),
    (["--service-node-port-range", "40000-30000"], "--service-node-port-range"),
    (["--storage", "etcd", "--etcd-servers", "127.0.0.1:2379"], "--etcd-servers"),
    (["--cluster-cidr", "nope"], "--cluster-cidr"),
])
def test_bad_flags_are_one_line_errors(tmp_path: Path, flags: list[str], needle: str) -> None:
    r = run("--data-dir", str(tmp_path / "d"), *flags)
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_unusable_data_dir(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    r = run("--data-dir", str(f / "sub"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--data-dir" in r.stderr, r.stderr


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("--data-dir", str(tmp_path / "d"), "--secure-port", str(port), "--controllers", "")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "already in use" in r.stderr, r.stderr


def test_credentials_first_start_and_restart(apiserver_factory: Any, tmp_path: Path) -> None:
    srv = apiserver_factory("--bind-address", "127.0.0.1", "--host-link-address", "192.168.77.1",
                            "--controllers", "", name="creds")
    kc = yaml.safe_load(srv.kubeconfig.read_text())
    assert kc["clusters"][0]["cluster"]["server"] == srv.url
    ca_pem = base64.b64decode(kc["clusters"][0]["cluster"]["certificate-authority-data"])
    assert ca_pem == srv.ca.read_bytes()
    assert kc["users"][0]["user"]["token"] == srv.token
    assert oct(os.stat(srv.data_dir / "pki" / "ca.key").st_mode & 0o777) == "0o600"
    cert = x509.load_pem_x509_certificate((srv.data_dir / "pki" / "apiserver.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    assert {"127.0.0.1", "192.168.77.1", "10.96.0.1"} <= ips
    assert {"kubernetes", "kubernetes.default.svc.cluster.local", "localhost"} <= set(
        san.get_values_for_type(x509.DNSName))
    code, _, _ = srv.request("POST", "/api/v1/namespaces/default/services",
                             b'{"metadata":{"name":"kept"},"spec":{"ports":[{"port":80}]}}',
                             {"Content-Type": "application/json"})
    assert code == 201
    assert srv.stop() == 0  # SIGTERM: clean shutdown, exit 0
    assert "Traceback" not in srv.log()
    srv.start()
    assert srv.ca.read_bytes() == ca_pem  # same CA after a restart
    code, _, body = srv.request("GET", "/api/v1/namespaces/default/services/kept")
    assert code == 200 and b'"kept"' in body
