"""Kubernetes `Status` errors (apimachinery pkg/api/errors): one exception type, one builder per reason.

Every failure the apiserver reports — REST or in-process registry — is an `ApiError` carrying the
HTTP code, the reason and the Status body, so handlers only ever serialise `err.status()`.
"""

from __future__ import annotations

from typing import Any

OPTIMISTIC_LOCK_MSG = "the object has been modified; please apply your changes to the latest version and try again"


class ApiError(Exception):
    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.retry_after = retry_after

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            st["details"] = self.details
        return st

    def __repr__(self) -> str:
        return f"ApiError({self.code}, {self.reason!r}, {self.message!r})"


def _details(resource: str, name: str = "", group: str = "", **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if name:
        d["name"] = name
    if group:
        d["group"] = group
    if resource:
        d["kind"] = resource
    d.update(extra)
    return d


def _qualified(resource: str, group: str) -> str:
    return f"{resource}.{group}" if group else resource


def not_found(resource: str, name: str, group: str = "") -> ApiError:
    return ApiError(
        404, "NotFound", f'{_qualified(resource, group)} "{name}" not found', details=_details(resource, name, group)
    )


def already_exists(resource: str, name: str, group: str = "") -> ApiError:
    return ApiError(
        409,
        "AlreadyExists",
        f'{_qualified(resource, group)} "{name}" already exists',
        details=_details(resource, name, group),
    )


def conflict(resource: str, name: str, group: str = "", why: str = OPTIMISTIC_LOCK_MSG) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {_qualified(resource, group)} "{name}": {why}',
        details=_details(resource, name, group),
    )


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def forbidden(resource: str, name: str, message: str, group: str = "") -> ApiError:
    return ApiError(403, "Forbidden", message, details=_details(resource, name, group))


def method_not_allowed(message: str = "the server does not allow this method on the requested resource") -> ApiError:
    return ApiError(405, "MethodNotAllowed", message)


def not_acceptable(message: str) -> ApiError:
    return ApiError(406, "NotAcceptable", message)


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def too_large_body(limit: int) -> ApiError:
    return ApiError(413, "RequestEntityTooLarge", f"Request entity too large: limit is {limit}")


def unsupported_media_type(content_type: str, supported: list[str]) -> ApiError:
    return ApiError(
        415,
        "UnsupportedMediaType",
        f'the body of the request was in an unknown format - accepted media types include: {", ".join(supported)}'
        f" (got {content_type!r}; this server requires JSON)",
    )


def invalid(kind: str, name: str, causes: list[dict[str, str]], group: str = "") -> ApiError:
    """422 Invalid; causes are StatusCauses {reason, message, field} (fielderrors.FieldError.cause())."""
    parts = [f"{c['field']}: {c['message']}" if c.get("field") else c["message"] for c in causes]
    if len(parts) == 1:
        summary = parts[0]
    else:
        summary = "[" + ", ".join(parts) + "]"
    qual = f"{kind}.{group}" if group else kind
    return ApiError(
        422,
        "Invalid",
        f'{qual} "{name}" is invalid: {summary}',
        details=_details(kind, name, group, causes=causes),
    )


def internal(message: str) -> ApiError:
    return ApiError(500, "InternalError", f"Internal error occurred: {message}")


def timeout(message: str, retry_after: int = 1, causes: list[dict[str, str]] | None = None) -> ApiError:
    details: dict[str, Any] = {"retryAfterSeconds": retry_after}
    if causes:
        details["causes"] = causes
    return ApiError(504, "Timeout", message, details=details, retry_after=retry_after)


def too_large_resource_version(requested: int, current: int) -> ApiError:
    return timeout(
        f"Timeout: Too large resource version: {requested}, current: {current}",
        retry_after=1,
        causes=[{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
    )


def expired_rv(requested: int, oldest: int) -> ApiError:
    return gone(f"too old resource version: {requested} ({oldest})")


def cause(field: str, message: str, ctype: str = "FieldValueInvalid") -> dict[str, str]:
    """A StatusCause (its type travels under the JSON key `reason`, as in metav1.StatusCause)."""
    return {"reason": ctype, "message": message, "field": field}


def invalid_list_options(field: str, message: str) -> ApiError:
    """422 on kind ListOptions (apimachinery ValidateListOptions)."""
    return invalid("ListOptions", "", [cause(field, f"Forbidden: {message}", "FieldValueForbidden")], "meta.k8s.io")


def invalid_param(field: str, value: str, message: str) -> ApiError:
    return invalid(
        "ListOptions", "", [cause(field, f'Invalid value: "{value}": {message}')], "meta.k8s.io"
    )
