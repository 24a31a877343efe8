"""The media-socket capability: a carrier's WebSocket dialect, normalized for ingress.

A provider's stream capability reads the carrier's opening frames (the handshake) and returns a
:class:`StreamStart` with a :class:`MediaCodec` for the rest of the call. Ingress owns the socket, the
run and the close codes; a provider only says *why* it refuses (:class:`StreamRefused` with a kind),
and ingress decides which close code that kind becomes (``services/ingress/.../close_codes.py``).

There are two ways a carrier's socket reaches voicebus, hence two handshake entry points:

- **Agent Stream** (``/api/v1/agent-stream/{agent_uuid}?provider=...``): the URL names only the agent;
  the handshake finds the carrier configuration (``Domain``, ``AccountSid``) and confirms the call.
- **Per-call media socket** (``/api/v1/telephony/media/{call_id}``): answer markup sent the carrier
  here; voicebus already knows the configuration, and the handshake returns the single-use token the
  carrier echoes back (a ``<Parameter>``, a header, a path part: whatever the markup used).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from voicebus.bus.messages import TelephonyMatch
from voicebus.telephony.webhook import WebhookRequest

_PRINTABLE = re.compile(r"[^\x20-\x7e]")

RefusalKind = Literal["handshake", "timeout", "internal", "unauthorized"]


def echo_safe(value: str, limit: int = 48) -> str:
    """Make caller-supplied text safe to echo in a close reason or a log line.

    Control characters and non-ASCII are replaced so a hostile query string cannot forge log lines or
    blow the close-frame budget; long values are cut with an ellipsis so the reason stays readable.
    """
    cleaned = _PRINTABLE.sub("?", value)
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 3] + "..."
    return cleaned


class StreamRefused(Exception):
    """The carrier's socket must be refused; ``kind`` says why, ingress picks the close code.

    ``handshake``: the carrier's opening was wrong (4400). ``timeout``: it did not come in time (4408).
    ``unauthorized``: signature or token refused (4401 on per-call sockets, 4400 on Agent Stream).
    ``internal``: a voicebus service failed (1011).
    """

    def __init__(self, kind: RefusalKind, reason: str) -> None:
        self.kind = kind
        self.reason = reason
        super().__init__(f"{kind}: {reason}")


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
class StreamServices(Protocol):
    """What a handshake may ask of voicebus (ingress implements it over the bus).

    Implementations raise ``StreamRefused("internal", ...)`` when the service that answers is
    unreachable, so a provider module never sees bus error codes.
    """

    async def match_telephony(self, organization_id: int, provider: str, account_id: str) -> TelephonyMatch | None:
        """The organization's stored configuration for this carrier account, or None if there is none."""
        ...

    async def confirm_call(self, telephony_config_id: int, carrier_call_id: str) -> bool:
        """Whether the carrier confirms this call on the configuration's account (call-control asks it
        with the stored credentials and, when it does, records the call's leg)."""
        ...

    async def verify_upgrade(self, telephony_config_id: int) -> tuple[bool, str]:
        """Whether the socket upgrade carries a valid carrier signature for this configuration."""
        ...


@dataclass
class StreamContext:
    """Everything a handshake gets besides the frames."""

    params: Mapping[str, str]  # query parameters of the socket URL
    upgrade: WebhookRequest  # the upgrade request (GET, public URL, headers): what a signature covers
    organization_id: int
    services: StreamServices
    timeout_s: float
    telephony_config_id: int | None = None  # known on per-call media sockets


@dataclass
class StreamStart:
    """What a successful handshake learned; ingress records it on the run and offers the call.

    ``gathered_context`` and ``log_fields`` are merged into the run's ``gathered_context`` and
    ``logs.inbound_webhook``; ``caller_number``/``called_number`` fill ``initial_context`` when the URL
    did not carry ``from``/``to``. ``token`` is the per-call socket's credential as the carrier echoed
    it (never logged, never recorded).
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
    token: str | None = field(default=None, repr=False)
    confirmed: bool = False  # True when the handshake already had call-control confirm the call


class StreamHandshake(Protocol):
    """A carrier's opening on a media socket.

    Must finish reading the carrier's opening messages within ``ctx.timeout_s`` (raising
    ``StreamRefused("timeout", "Handshake timeout")`` otherwise): ingress holds a quota slot and a run
    for the socket, so an unbounded read would let a silent client pin them.
    """

    async def __call__(self, receive: ReceiveFrame, ctx: StreamContext) -> StreamStart: ...


@dataclass(frozen=True)
class StreamCapability:
    """A provider's media dialect. ``agent_stream`` is None when the provider has no Agent Stream
    support (ingress answers 1011); ``media_socket`` is None when no answer markup points here."""

    sample_rate: int
    agent_stream: StreamHandshake | None = None
    media_socket: StreamHandshake | None = None


async def next_frame(receive: ReceiveFrame, deadline: float) -> Frame:
    """The next frame before the handshake deadline; CarrierDisconnected propagates as is."""
    remaining = deadline - asyncio.get_running_loop().time()
    if remaining <= 0:
        raise StreamRefused("timeout", "Handshake timeout")
    try:
        return await asyncio.wait_for(receive(), remaining)
    except TimeoutError as e:
        raise StreamRefused("timeout", "Handshake timeout") from e
