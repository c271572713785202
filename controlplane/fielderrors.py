"""Field-level validation errors, rendered as apimachinery's `field.Error` renders them.

Call signature for the REST layer (H2a):

    errs: list[FieldError] = validation.validate_create("Service", obj)
    if errs:
        raise errors.invalid("Service", name, [e.cause() for e in errs], group="")

`FieldError.cause()` gives the wire form of a `StatusCause`
(`{"reason": "FieldValueInvalid", "message": "Invalid value: 0: must be ...", "field": "spec.ports[0].port"}`;
the JSON key is `reason`, as in metav1.StatusCause) and `str(err)` / `summary()` give the
`spec.ports[0].port: Invalid value: ...` text that goes into the Status message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

REQUIRED = "FieldValueRequired"
INVALID = "FieldValueInvalid"
NOT_SUPPORTED = "FieldValueNotSupported"
DUPLICATE = "FieldValueDuplicate"
FORBIDDEN = "FieldValueForbidden"
TOO_MANY = "FieldValueTooMany"
TOO_LONG = "FieldValueTooLong"
NOT_FOUND = "FieldValueNotFound"

_LABELS = {
    REQUIRED: "Required value",
    INVALID: "Invalid value",
    NOT_SUPPORTED: "Unsupported value",
    DUPLICATE: "Duplicate value",
    FORBIDDEN: "Forbidden",
    TOO_MANY: "Too many",
    TOO_LONG: "Too long",
    NOT_FOUND: "Not found",
}
# types whose body does not repeat the offending value (apimachinery ErrorBody)
_NO_VALUE = {REQUIRED, FORBIDDEN, TOO_LONG}


def render_value(value: Any) -> str:
    """How a bad value is quoted in a message: strings quoted, numbers and booleans bare."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if value is None:
        return "null"
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class FieldError:
    type: str  # one of the FieldValue* constants (StatusCause.reason)
    field: str  # JSON path, e.g. spec.ports[0].port
    detail: str = ""
    value: Any = None
    show_value: bool = True

    def body(self) -> str:
        s = _LABELS.get(self.type, self.type)
        if self.type not in _NO_VALUE and self.show_value:
            s += ": " + render_value(self.value)
        if self.detail:
            s += ": " + self.detail
        return s

    def summary(self) -> str:
        return f"{self.field}: {self.body()}" if self.field else self.body()

    def __str__(self) -> str:
        return self.summary()

    def cause(self) -> dict[str, str]:
        return {"reason": self.type, "message": self.body(), "field": self.field}


def required(field: str, detail: str = "") -> FieldError:
    return FieldError(REQUIRED, field, detail)


def invalid(field: str, value: Any, detail: str) -> FieldError:
    return FieldError(INVALID, field, detail, value)


def not_supported(field: str, value: Any, supported: list[str] | tuple[str, ...]) -> FieldError:
    detail = "supported values: " + ", ".join(json.dumps(s) for s in supported) if supported else ""
    return FieldError(NOT_SUPPORTED, field, detail, value)


def duplicate(field: str, value: Any) -> FieldError:
    return FieldError(DUPLICATE, field, "", value)


def forbidden(field: str, detail: str) -> FieldError:
    return FieldError(FORBIDDEN, field, detail)


def too_many(field: str, actual: int, limit: int) -> FieldError:
    return FieldError(TOO_MANY, field, f"must have at most {limit} items", actual)


def too_long(field: str, limit: int) -> FieldError:
    return FieldError(TOO_LONG, field, f"must have at most {limit} bytes")


def summary_message(kind: str, name: str, errs: list[FieldError]) -> str:
    """`Service "x" is invalid: ...` as apierrors.NewInvalid words it (group-qualified kinds pass `Kind.group`)."""
    parts = [e.summary() for e in errs]
    agg = parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"
    return f'{kind} "{name}" is invalid: {agg}'
