"""Logging that greps well: `ts level component=proxy node=node1 message`."""

from __future__ import annotations

import logging
import sys


class _KVFormatter(logging.Formatter):
    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__()
        self.prefix = " ".join(f"{k}={v}" for k, v in fields.items())

    def format(self, record: logging.LogRecord) -> str:
        ts = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        msg = record.getMessage()
        line = f"{ts}.{int(record.msecs):03d} {record.levelname.lower()} {self.prefix} logger={record.name} {msg}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(component: str, level: str = "info", **fields: str) -> None:
    """Configure the root logger once for a foreground component (apiserver, node, proxy)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KVFormatter({"component": component, **fields}))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
