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


def write_in_place(path: str | os.PathLike[str], text: str) -> None:
    """Overwrite a small file without rename or truncate-to-zero: on ext4 both force a data
    flush (auto_da_alloc, ~5 ms each); one pwrite + ftruncate to the new length does not.
    A single small write is not torn by a process kill; readers tolerate a concurrent write."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


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
        self._hosts = [str(h) for h in self.network.hosts() if str(h) not in self.reserved]
        self._index = {h: i for i, h in enumerate(self._hosts)}
        # key -> ip, valid while the directory's mtime is the one we last saw (any lease file
        # created or removed by anyone changes it); saves a scan of every lease per allocation
        self._by_key: dict[str, str] = {}
        self._seen_mtime: int | None = None

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

    def _dir_mtime(self) -> int | None:
        try:
            return os.stat(self.dir).st_mtime_ns
        except FileNotFoundError:
            return None

    def lookup(self, key: str) -> str | None:
        mtime = self._dir_mtime()
        if mtime is None:
            return None
        if mtime != self._seen_mtime:
            self._by_key = {owner: ip for ip, owner in self.leases().items()}
            self._seen_mtime = mtime
        ip = self._by_key.get(key)
        if ip is not None:
            try:
                if (self.dir / ip).read_text().strip() == key:
                    return ip
            except FileNotFoundError:
                pass
            del self._by_key[key]
        return None

    def _note(self, key: str, ip: str | None, before: int | None) -> None:
        """Keep the cache in step with our own change (if nobody else changed the dir meanwhile)."""
        if ip is None:
            self._by_key.pop(key, None)
        else:
            self._by_key[key] = ip
        if before == self._seen_mtime:
            self._seen_mtime = self._dir_mtime()

    # -- writing -------------------------------------------------------------------------------

    def _candidates(self) -> list[str]:
        hosts = self._hosts
        try:
            last = (self.dir / LAST_RESERVED).read_text().strip()
            start = self._index[last] + 1
        except (FileNotFoundError, KeyError):
            start = 0
        # start right after the last reserved IP, wrapping around
        return hosts[start:] + hosts[:start]

    def allocate(self, key: str) -> str:
        """Lease an IP for key (idempotent: the same key gets its existing lease back)."""
        existing = self.lookup(key)
        if existing:
            return existing
        self.dir.mkdir(parents=True, exist_ok=True)
        before = self._dir_mtime()
        for ip in self._candidates():
            path = self.dir / ip
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as f:
                f.write(key)
            write_in_place(self.dir / LAST_RESERVED, ip.ljust(15) + "\n")
            self._note(key, ip, before)
            return ip
        raise IpamExhausted(f"no free IP in {self.network} ({len(self.leases())} leased)")

    def release(self, key: str) -> str | None:
        """Drop key's lease; returns the IP it held (None if it held none)."""
        ip = self.lookup(key)
        if ip is None:
            return None
        before = self._seen_mtime
        try:
            os.unlink(self.dir / ip)
        except FileNotFoundError:
            pass
        self._note(key, None, before)
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
