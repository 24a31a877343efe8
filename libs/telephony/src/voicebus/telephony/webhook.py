"""Carrier webhooks, normalized: the request as it arrived, the inbound call it announces, the status a
callback reports, and the answer markup that points the carrier at a per-call media socket.

Ingress owns the HTTP side and the routing; a provider's :class:`WebhookDialect` only reads and writes
its carrier's formats. Signature checks are a separate capability (:mod:`voicebus.telephony.verify`)
because they need secrets, which only call-control holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable
from urllib.parse import parse_qsl

from voicebus.telephony.calls import CallStatus

MAX_WEBHOOK_BODY = 64 * 1024  # carriers send a few hundred bytes; a stranger gets no more than this


@dataclass(frozen=True)
class WebhookRequest:
    """An HTTP request exactly as the carrier sent it: what a signature covers.

    ``url`` is the public URL the carrier called (scheme, host, path and query), not the one the
    process saw behind a proxy. Header names are lower-case.
    """

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def content_type(self) -> str:
        return (self.header("content-type") or "").split(";")[0].strip().lower()

    def form(self) -> dict[str, str]:
        """The body as ``application/x-www-form-urlencoded`` fields (last value wins), or ``{}``."""
        if self.content_type not in ("application/x-www-form-urlencoded", ""):
            return {}
        try:
            text = self.body.decode("utf-8")
        except UnicodeDecodeError:
            return {}
        return dict(parse_qsl(text, keep_blank_values=True))

    def form_pairs(self) -> list[tuple[str, str]]:
        """Every form field in order, repeated keys kept (what signature schemes sort over)."""
        if self.content_type not in ("application/x-www-form-urlencoded", ""):
            return []
        try:
            return parse_qsl(self.body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            return []


Direction = Literal["inbound", "outbound"]


@dataclass(frozen=True)
class InboundCall:
    """What an inbound webhook announces, in carrier-neutral terms."""

    provider: str
    account_id: str  # routes the call to a stored configuration (ProviderSpec.account_id_field)
    carrier_call_id: str
    from_number: str | None
    to_number: str | None
    direction: Direction = "inbound"
    idempotency_key: str | None = None  # a retried delivery of the same webhook carries the same key
    fields: dict[str, Any] = field(default_factory=dict)  # what the run's inbound_webhook log records


@dataclass(frozen=True)
class StatusUpdate:
    """One status callback: the normalized status (None when the carrier's word maps to none)."""

    carrier_call_id: str
    status: CallStatus | None
    raw_status: str
    duration_s: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MediaSocket:
    """Where the answer markup sends the carrier: a per-call socket and its single-use token.

    The token is a credential: markup carries it the way the carrier allows (a ``<Parameter>`` for
    Twilio, whose ``<Stream url>`` takes no query string), and nothing logs it.
    """

    url: str  # wss://host/api/v1/telephony/media/{call_id}
    token: str
    status_url: str | None = None


@dataclass(frozen=True)
class Markup:
    """An HTTP answer to a carrier webhook."""

    body: str
    media_type: str = "application/xml"
    status_code: int = 200


class WebhookParseError(ValueError):
    """The webhook is not a well-formed request of this carrier (the message says what is missing)."""


@runtime_checkable
class WebhookDialect(Protocol):
    """A carrier's webhook formats. Pure functions of the request: no I/O, no secrets."""

    # Paths under /api/v1/telephony/ that the carrier's documentation uses for this provider, mapped to
    # the generic webhook they are ("answer" or "status"); ingress mounts them from the registry.
    aliases: Mapping[str, Literal["answer", "status"]]

    def detect(self, req: WebhookRequest) -> bool:
        """Whether this request comes from this carrier (headers or body shape); never raises."""
        ...

    def parse_inbound(self, req: WebhookRequest) -> InboundCall:
        """Raises :class:`WebhookParseError` with a specific message."""
        ...

    def answer_stream(self, socket: MediaSocket, call: InboundCall | None) -> Markup:
        """Markup that connects the call's audio to ``socket``."""
        ...

    def answer_refusal(self, message: str) -> Markup:
        """Markup that tells the caller ``message`` and hangs up (unknown number, overload, ...)."""
        ...

    def parse_status(self, req: WebhookRequest) -> StatusUpdate:
        """Raises :class:`WebhookParseError`."""
        ...
