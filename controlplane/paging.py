"""Continue tokens for chunked lists: base64url JSON {v, rv, start} as kube-apiserver's (the list's
revision and the last key returned). A token whose revision has been compacted answers 410."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import orjson

from controlplane import errors


@dataclass(frozen=True, slots=True)
class Token:
    rv: int
    start_after: str


def encode(rv: int, last_key: str) -> str:
    raw = orjson.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": last_key})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str) -> Token:
    try:
        pad = "=" * (-len(token) % 4)
        doc = orjson.loads(base64.urlsafe_b64decode(token + pad))
        if not isinstance(doc, dict) or doc.get("v") != "meta.k8s.io/v1":
            raise ValueError("unknown version")
        rv, start = doc["rv"], doc["start"]
        if not isinstance(rv, int) or rv <= 0 or not isinstance(start, str) or not start.startswith("/registry/"):
            raise ValueError("bad fields")
    except (ValueError, KeyError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise errors.bad_request("continue key is not valid: incorrect encoded start resourceVersion") from None
    return Token(rv, start)
