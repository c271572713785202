"""First-start credentials in the data dir: a CA, the serving certificate, the admin token and kubeconfig.

Files (all kept across restarts; only missing ones are generated):
  DATA_DIR/pki/ca.crt, ca.key            self-signed CA (ECDSA P-256, 10 years)
  DATA_DIR/pki/apiserver.crt, .key       serving cert signed by the CA, SANs below (regenerated when
                                         the wanted SANs change, e.g. a new --bind-address)
  DATA_DIR/tokens.csv                    static token file: token,user,uid,"group1,group2"
  DATA_DIR/kubeconfig                    admin kubeconfig: the CA, https://127.0.0.1:PORT, the admin token
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DNS_SANS = (
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    "localhost",
)
ADMIN_USER = "kpx-admin"
ADMIN_GROUPS = ("system:masters",)


@dataclass(frozen=True)
class Credentials:
    ca_cert: Path
    cert: Path
    key: Path
    kubeconfig: Path
    tokens: Path
    admin_token: str


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ensure_ca(pki: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    crt, keyf = pki / "ca.crt", pki / "ca.key"
    if crt.exists() and keyf.exists():
        key = serialization.load_pem_private_key(keyf.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return x509.load_pem_x509_certificate(crt.read_bytes()), key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kpx-ca")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(keyf, _key_pem(key))
    _write_public(crt, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _sans(ips: Iterable[str], dns: Iterable[str]) -> tuple[set[str], set[str]]:
    return {str(ipaddress.ip_address(i)) for i in ips}, set(dns)


def _cert_sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    return {str(i) for i in ext.get_values_for_type(x509.IPAddress)}, set(ext.get_values_for_type(x509.DNSName))


def ensure_credentials(
    data_dir: Path,
    *,
    port: int,
    ip_sans: Iterable[str],
    dns_sans: Iterable[str] = DEFAULT_DNS_SANS,
    kubeconfig_server: str | None = None,
) -> Credentials:
    pki = data_dir / "pki"
    pki.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ensure_ca(pki)
    want_ips, want_dns = _sans(ip_sans, dns_sans)
    crt, keyf = pki / "apiserver.crt", pki / "apiserver.key"
    fresh = False
    if crt.exists() and keyf.exists():
        cur = x509.load_pem_x509_certificate(crt.read_bytes())
        have_ips, have_dns = _cert_sans(cur)
        fresh = want_ips <= have_ips and want_dns <= have_dns and cur.not_valid_after_utc > _now() + dt.timedelta(days=30)
    if not fresh:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        san: list[x509.GeneralName] = [x509.DNSName(d) for d in sorted(want_dns)]
        san += [x509.IPAddress(ipaddress.ip_address(i)) for i in sorted(want_ips)]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=825))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(keyf, _key_pem(key))
        _write_public(crt, cert.public_bytes(serialization.Encoding.PEM))

    tokens = data_dir / "tokens.csv"
    token = read_admin_token(tokens)
    if token is None:
        token = secrets.token_hex(24)
        _write_private(tokens, f'{token},{ADMIN_USER},{ADMIN_USER},"{",".join(ADMIN_GROUPS)}"\n'.encode())

    kubeconfig = data_dir / "kubeconfig"
    server = kubeconfig_server or f"https://127.0.0.1:{port}"
    write_kubeconfig(kubeconfig, server=server, ca_file=pki / "ca.crt", token=token)
    return Credentials(pki / "ca.crt", crt, keyf, kubeconfig, tokens, token)


def read_admin_token(tokens: Path) -> str | None:
    if not tokens.exists():
        return None
    for line in tokens.read_text().splitlines():
        parts = line.split(",")
        if len(parts) >= 3 and parts[1] == ADMIN_USER:
            return parts[0]
    return None


def write_kubeconfig(path: Path, *, server: str, ca_file: Path, token: str, name: str = "kpx") -> None:
    import base64

    ca_data = base64.b64encode(ca_file.read_bytes()).decode()
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority-data": ca_data}}],
        "users": [{"name": ADMIN_USER, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": ADMIN_USER, "namespace": "default"}}],
        "current-context": name,
        "preferences": {},
    }
    _write_private(path, yaml.safe_dump(doc, sort_keys=False).encode())


def server_ssl_context(creds: Credentials) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(creds.cert), str(creds.key))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
