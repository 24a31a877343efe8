"""Domain errors, each with the HTTP status and the NATS error code it maps to.

The store raises these; the REST layer and the NATS layer translate them, so a missing agent is a
404 for an admin and ``not_found`` for ingress from one code path.
"""

from __future__ import annotations

from typing import Any


class ConfigError(Exception):
    status = 400
    code = "invalid_request"
    headers: dict[str, str] | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ConfigError):
    status = 404
    code = "not_found"


class UnknownAccount(NotFound):
    """Inbound routing: no configuration has this provider account."""

    code = "unknown_account"


class UnknownNumber(NotFound):
    """Inbound routing: the account is known, the called number is not configured there (or inactive)."""

    code = "unknown_number"


class Conflict(ConfigError):
    status = 409
    code = "conflict"


class Invalid(ConfigError):
    """Bad input. ``errors`` follows FastAPI's 422 shape (loc, msg, type) so clients parse one format."""

    status = 422
    code = "invalid_request"

    def __init__(self, message: str, loc: tuple[str | int, ...] = ("body",),
                 errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [{"loc": list(loc), "msg": message, "type": "value_error"}]


class Unauthorized(ConfigError):
    status = 401
    code = "unauthorized"


class QuotaExceededError(ConfigError):
    status = 429
    code = "quota_exceeded"


class LeaseExpiredError(ConfigError):
    status = 409
    code = "lease_expired"


class SecretUnreadableError(ConfigError):
    status = 500
    code = "secret_unreadable"


class BadRequest(ConfigError):
    status = 400
    code = "bad_request"


class CallNotPlaced(ConfigError):
    """An outbound call the carrier (or call-control) did not place; ``status`` per cause, the run is failed."""

    def __init__(self, message: str, status: int, code: str, run_id: int,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.run_id = run_id
        self.headers = headers
