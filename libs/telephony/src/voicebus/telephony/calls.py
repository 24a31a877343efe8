"""Carrier-neutral call vocabulary: statuses, REST outcomes and the one carrier error type.

These live outside every provider package so that call-control, config and ingress can branch on a
carrier's answer without knowing which carrier gave it, and so that no provider imports another one
to reuse them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# The normalized call statuses every status callback is mapped onto (docs/carriers.md).
CallStatus = Literal["initiated", "ringing", "answered", "completed", "busy", "no-answer", "failed", "canceled"]
CALL_STATUSES: tuple[str, ...] = ("initiated", "ringing", "answered", "completed", "busy", "no-answer", "failed",
                                  "canceled")
# A call in one of these statuses is over; the four after "completed" never reached the agent.
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "busy", "no-answer", "failed", "canceled"})
NOT_CONNECTED_STATUSES: frozenset[str] = frozenset({"busy", "no-answer", "failed", "canceled"})

HangupOutcome = Literal["hung_up", "already_ended"]

# The codes call-control answers with on the bus; stable, documented in docs/bus-contracts.md.
CarrierErrorCode = Literal["carrier_auth_failed", "carrier_error", "carrier_invalid_number", "not_supported"]


class CarrierError(Exception):
    """A carrier REST call failed.

    ``code`` is what call-control answers other services with; ``message`` is for humans and never
    holds a secret (no token, no Authorization header, no signed URL).
    """

    def __init__(self, code: CarrierErrorCode, message: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class DialRequest:
    """What call-control asks a carrier for when voicebus places a call."""

    to_number: str
    from_number: str
    answer_url: str  # the carrier fetches its markup here once the callee answers
    status_url: str  # signed status callbacks for this leg go here
    ring_timeout_s: int = 30


@dataclass(frozen=True)
class DialResult:
    carrier_call_id: str
    status: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CallInfo:
    """A carrier's view of one call (status and, once known, duration and price)."""

    carrier_call_id: str
    status: CallStatus | None
    raw_status: str
    duration_s: int | None = None
    price: float | None = None
    price_unit: str | None = None


@dataclass(frozen=True)
class BindResult:
    """A number's inbound URL was pointed at voicebus (``number_sid`` is the carrier's id for it)."""

    number: str
    number_sid: str
    voice_url: str
