"""Key-range helpers shared by the backends (etcd-style half-open prefix ranges)."""

from __future__ import annotations


def prefix_end(prefix: str) -> str:
    """The smallest key greater than every key starting with prefix ("" = no upper bound).

    Keys compare as UTF-8 bytes in both SQLite (BINARY collation) and etcd, which is the same
    order as Python's code-point order for str."""
    p = prefix
    while p:
        last = ord(p[-1])
        if last < 0x10FFFF:
            return p[:-1] + chr(last + 1)
        p = p[:-1]
    return ""


def prefix_end_bytes(prefix: bytes) -> bytes:
    """etcd's range_end for a prefix (b"\\0" = every key when prefix is empty)."""
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return b"\0"
