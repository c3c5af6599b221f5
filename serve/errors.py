"""The errors of serving: EngineError, what the store and the engine raise for a request they
refuse (it crosses Ray processes intact), and ApiError, the HTTP error the ingress answers with."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class EngineError(Exception):
    """A request serving refuses; `status` is the HTTP status the ingress answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message

    def __reduce__(self):  # travels between Ray processes intact
        return EngineError, (self.status, self.message)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def api_error(e: EngineError) -> ApiError:
    kind = {404: "not_found_error", 503: "server_error"}.get(e.status, "invalid_request_error")
    return ApiError(e.status, e.message, kind)


def engine_error_in(e: BaseException) -> ApiError | None:
    """An EngineError raised in a model replica comes back wrapped by Ray; find it."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, EngineError):
            return api_error(e)
        e = getattr(e, "cause", None) or e.__cause__
    return None


def describe(e: ValidationError, reasons: dict[str, str | None] | None = None) -> str:
    """A request body's first validation errors, one line; a parameter the body does not know is
    named as unsupported (with its reason from `reasons`, when there is one)."""
    parts = []
    for err in e.errors()[:4]:
        where = ".".join(str(x) for x in err["loc"]) or "body"
        if err["type"] == "extra_forbidden":
            why = (reasons or {}).get(str(err["loc"][-1]))
            parts.append(f"unsupported parameter {where!r}" + (f": {why}" if why else ""))
        else:
            parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
