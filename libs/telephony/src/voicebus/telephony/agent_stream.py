"""Provider-neutral pieces of the Agent Stream endpoint (``/api/v1/agent-stream/{agent_uuid}``).

Ingress owns the socket and the run lifecycle; each carrier that supports Agent Stream owns only its
own wire protocol, in ``providers/<name>/handshake.py`` (which exports ``HANDSHAKE``) and
``providers/<name>/media.py``. Keeping this boundary narrow is what lets a new carrier be added without
touching ingress: ingress finds the handshake by convention and talks to it through the protocols
below, never through carrier-specific types.

Everything a refusal needs to say to the carrier travels as :class:`HandshakeError` (close code plus a
reason that always fits in a close frame), so the code that detects a problem also decides how the
carrier is told about it, and ingress turns it into one close frame without guessing.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from voicebus.bus.messages import TelephonyMatch
from voicebus.telephony.registry import ProviderSpec

# --------------------------------------------------------------------------- close codes (see docs/agent-stream.md)
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008  # routing failure: missing/unknown provider, agent not found, quota exceeded
CLOSE_INTERNAL = 1011  # server failure, or a provider without Agent Stream support
CLOSE_RESTARTING = 1012  # this ingress replica is draining; the carrier may retry elsewhere
CLOSE_TRY_AGAIN = 1013  # no agent runner accepted the call in time
CLOSE_HANDSHAKE = 4400  # provider handshake error
CLOSE_HANDSHAKE_TIMEOUT = 4408  # connected/start did not arrive in time

MAX_CLOSE_REASON_BYTES = 123  # RFC 6455: a close frame's payload is at most 125 bytes, 2 are the code

INTERNAL_ERROR_REASON = "Internal server error"

_PRINTABLE = re.compile(r"[^\x20-\x7e]")


def fit_close_reason(reason: str) -> str:
    """Cut ``reason`` to what a close frame can carry, on a UTF-8 character boundary.

    A reason longer than 123 bytes makes the WebSocket library raise while closing, which would turn a
    precise refusal into a dropped connection; truncating here keeps every refusal a proper close frame.
    """
    data = reason.encode("utf-8")
    if len(data) <= MAX_CLOSE_REASON_BYTES:
        return reason
    return data[:MAX_CLOSE_REASON_BYTES].decode("utf-8", errors="ignore")


def echo_safe(value: str, limit: int = 48) -> str:
    """Make caller-supplied text safe to echo in a close reason or a log line.

    Control characters and non-ASCII are replaced so a hostile query string cannot forge log lines or
    blow the close-frame budget; long values are cut with an ellipsis so the reason stays readable.
    """
    cleaned = _PRINTABLE.sub("?", value)
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 3] + "..."
    return cleaned


class HandshakeError(Exception):
    """The socket must be refused with this close code and reason (already fitted to a close frame)."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = fit_close_reason(reason)
        super().__init__(f"{code} {self.reason}")


class CarrierDisconnected(Exception):
    """The carrier closed the socket (or it broke); raised by a :data:`ReceiveFrame` callable."""

    def __init__(self, code: int | None = None) -> None:
        self.code = code
        super().__init__(f"carrier disconnected (code {code})")


# A frame as the WebSocket delivered it: text frames are ``str``, binary frames ``bytes``.
Frame = str | bytes
# Returns the next frame; raises CarrierDisconnected when the socket is gone.
ReceiveFrame = Callable[[], Awaitable[Frame]]


# --------------------------------------------------------------------------- carrier messages, normalized
@dataclass(frozen=True)
class AudioIn:
    """Caller audio, already decoded to PCM16LE mono at the codec's sample rate (any length)."""

    pcm16: bytes


@dataclass(frozen=True)
class DtmfIn:
    digit: str


@dataclass(frozen=True)
class MarkIn:
    """The carrier finished playing everything sent before the mark with this name."""

    name: str


@dataclass(frozen=True)
class StopIn:
    """The carrier ended the stream: the caller hung up (or the carrier leg went away)."""


@dataclass(frozen=True)
class Ignored:
    """A frame that carries nothing for the call (keep-alives, unknown events, malformed input).

    ``problem`` is set when the frame was malformed, so ingress can count and log it without letting a
    single bad frame end a live call.
    """

    what: str
    problem: str | None = None


CarrierMessage = AudioIn | DtmfIn | MarkIn | StopIn | Ignored


@runtime_checkable
class MediaCodec(Protocol):
    """One call's media framing in both directions; ingress only ever sees PCM16 and normalized events."""

    sample_rate: int

    def decode(self, frame: Frame) -> CarrierMessage: ...

    def encode_audio(self, pcm16: bytes) -> Frame: ...

    def encode_clear(self) -> Frame | None:
        """Tell the carrier to drop buffered audio (barge-in); None when the carrier has no such command."""
        ...

    def encode_mark(self, name: str) -> Frame | None:
        """Ask the carrier to echo ``name`` once playback reaches this point; None if unsupported."""
        ...


# --------------------------------------------------------------------------- handshake
class HandshakeServices(Protocol):
    """What a provider handshake may ask of voicebus (ingress implements it over the bus).

    Implementations raise :class:`HandshakeError` (normally ``1011 Internal server error``) when the
    service that answers is unreachable, so the provider module never sees bus error codes.
    """

    async def match_telephony(self, organization_id: int, provider: str, account_id: str) -> TelephonyMatch | None:
        """The organization's stored configuration for this carrier account, or None if there is none."""
        ...

    async def validate_session(self, telephony_config_id: int, session: str) -> bool:
        """Whether the carrier confirms this session, using the configuration's stored credentials."""
        ...


@dataclass
class StreamStart:
    """What a successful handshake learned; ingress records it on the run and offers the call.

    ``gathered_context`` and ``log_fields`` are merged into the run's ``gathered_context`` and
    ``logs.inbound_webhook``; ``caller_number``/``called_number`` fill ``initial_context`` when the URL
    did not carry ``from``/``to``.
    """

    provider: str
    telephony_config_id: int | None
    carrier_call_ref: str | None
    stream_id: str
    codec: MediaCodec
    caller_number: str | None = None
    called_number: str | None = None
    gathered_context: dict[str, Any] = field(default_factory=dict)
    log_fields: dict[str, Any] = field(default_factory=dict)


class AgentStreamHandshake(Protocol):
    """A carrier's side of the Agent Stream handshake.

    ``perform`` must finish reading the carrier's opening messages within ``timeout_s`` (raising
    ``HandshakeError(4408, "Handshake timeout")`` otherwise): ingress holds a quota slot and a run for
    the socket, so an unbounded read would let a silent client pin them.
    """

    provider: str

    async def perform(
        self,
        receive: ReceiveFrame,
        *,
        params: Mapping[str, str],
        organization_id: int,
        services: HandshakeServices,
        timeout_s: float,
    ) -> StreamStart: ...


def load_handshake(spec: ProviderSpec) -> AgentStreamHandshake | None:
    """The handshake of a provider that declares Agent Stream support, found by package convention.

    Returns None when the provider does not support Agent Stream or ships no ``handshake`` module, so
    ingress can refuse with 1011 rather than fail on an import.
    """
    if not spec.supports_agent_stream:
        return None
    name = f"voicebus.telephony.providers.{spec.name}.handshake"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:  # the module exists but one of its imports is broken: that is a bug, say so
            raise
        return None
    return getattr(module, "HANDSHAKE", None)
