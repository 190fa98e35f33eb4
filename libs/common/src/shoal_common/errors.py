"""One error hierarchy for every service.

Each error carries what its callers need to act on it: a stable code, the HTTP status an API
answers with, whether retrying can help, and a hint for the human reading it.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ShoalError(Exception):
    """Base of every error Shoal raises on purpose."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, detail: str, *, hint: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.hint = hint
        self.extra = extra

    def problem(self) -> dict[str, Any]:
        """RFC 9457 problem details."""
        body: dict[str, Any] = {
            "type": f"https://shoal.dev/errors/{self.code}",
            "title": self.code.replace("_", " "),
            "status": self.http_status,
            "detail": self.detail,
        }
        if self.hint:
            body["hint"] = self.hint
        body.update(self.extra)
        return body


class InvalidInput(ShoalError):
    code = "invalid_input"
    http_status = 400


class SignatureInvalid(InvalidInput):
    code = "invalid_signature"


class Unauthorized(ShoalError):
    code = "unauthorized"
    http_status = 401


class Forbidden(ShoalError):
    code = "forbidden"
    http_status = 403


class NotFound(ShoalError):
    code = "not_found"
    http_status = 404


class Conflict(ShoalError):
    """A compare-and-set lost: the record moved on since it was read."""

    code = "conflict"
    http_status = 409
    retryable = True


class InvalidTransition(ShoalError):
    """The requested state change is not allowed from the current state."""

    code = "invalid_transition"
    http_status = 409


class AlreadyTerminal(InvalidTransition):
    code = "already_terminal"


class NotEnoughNodes(ShoalError):
    code = "not_enough_nodes"
    http_status = 400


class PayloadTooLarge(ShoalError):
    code = "payload_too_large"
    http_status = 413


class Unavailable(ShoalError):
    code = "unavailable"
    http_status = 503
    retryable = True
