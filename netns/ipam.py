"""Pod IP leases on disk, the way CNI's host-local plugin keeps them.

One directory per node range: a file named by each leased IP whose content is the owner key
(e.g. "default/web-1"), plus `last_reserved_ip` so allocation walks round-robin through the
range instead of handing a just-released IP straight to the next pod. A lease file is created
with O_EXCL, so two allocators can never hand out the same IP, and an IP is never reused while
its file exists. The lab's destroy removes the whole directory; a crashed agent's leases stay
until the sandbox they belong to is deleted (no host-local style leak: the sandbox record
names its lease).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

LAST_RESERVED = "last_reserved_ip"


class IpamExhausted(RuntimeError):
    """No free IP left in the range."""


class Ipam:
    def __init__(
        self, state_dir: str | os.PathLike[str], cidr: str, reserved: tuple[str, ...] | None = None
    ) -> None:
        self.dir = Path(state_dir)
        self.network = ipaddress.IPv4Network(cidr, strict=False)
        # The first host address is the bridge/gateway (cni0), like host-local's default gateway.
        gw = str(self.network.network_address + 1)
        self.reserved = set(reserved if reserved is not None else (gw,))
        self.prefixlen = self.network.prefixlen

    # -- reading -------------------------------------------------------------------------------

    def leases(self) -> dict[str, str]:
        """IP -> owner key for every lease on disk."""
        out: dict[str, str] = {}
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return out
        for name in names:
            if name == LAST_RESERVED or name.startswith("."):
                continue
            try:
                out[name] = (self.dir / name).read_text().strip()
            except FileNotFoundError:
                continue
        return out

    def lookup(self, key: str) -> str | None:
        for ip, owner in self.leases().items():
            if owner == key:
                return ip
        return None

    # -- writing -------------------------------------------------------------------------------

    def _candidates(self) -> list[ipaddress.IPv4Address]:
        hosts = [h for h in self.network.hosts() if str(h) not in self.reserved]
        try:
            last = ipaddress.IPv4Address((self.dir / LAST_RESERVED).read_text().strip())
        except (FileNotFoundError, ValueError):
            return hosts
        # start right after the last reserved IP, wrapping around
        start = next((i + 1 for i, h in enumerate(hosts) if h == last), 0)
        return hosts[start:] + hosts[:start]

    def allocate(self, key: str) -> str:
        """Lease an IP for key (idempotent: the same key gets its existing lease back)."""
        existing = self.lookup(key)
        if existing:
            return existing
        self.dir.mkdir(parents=True, exist_ok=True)
        for ip in self._candidates():
            path = self.dir / str(ip)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as f:
                f.write(key)
            tmp = self.dir / f".{LAST_RESERVED}.{os.getpid()}"
            tmp.write_text(str(ip))
            os.replace(tmp, self.dir / LAST_RESERVED)
            return str(ip)
        raise IpamExhausted(f"no free IP in {self.network} ({len(self.leases())} leased)")

    def release(self, key: str) -> str | None:
        """Drop key's lease; returns the IP it held (None if it held none)."""
        ip = self.lookup(key)
        if ip is None:
            return None
        try:
            os.unlink(self.dir / ip)
        except FileNotFoundError:
            pass
        return ip

    def release_ip(self, ip: str, key: str | None = None) -> bool:
        """Drop the lease on ip (only if it still belongs to key, when key is given)."""
        path = self.dir / ip
        try:
            if key is not None and path.read_text().strip() != key:
                return False
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False
