"""The provider contract: what a carrier's fake supplies so one generic test suite can exercise it.

``libs/telephony/tests/test_provider_contract.py`` runs over every registered provider and picks the
checks by capability (webhook, verify, stream, rest). A provider's fake module (``ProviderSpec.fake``)
exposes ``CONTRACT: ContractKit`` built from the *carrier's* side of the protocol: requests signed as
the carrier signs them (with the carrier's official SDK where one exists), frames written from the
carrier's documentation, and canned REST answers copied from it. The suite then checks the product's
side (dialect, verifier, REST client) against that, so adding a carrier adds it to the suite with no
new test code, and the two sides of each check never share code.

Nothing here names a carrier.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from voicebus.telephony.rest import RestAction
from voicebus.telephony.stream import Frame
from voicebus.telephony.webhook import Markup, WebhookRequest


@dataclass(frozen=True)
class SentFrame:
    """A frame voicebus sent, as the carrier reads it."""

    kind: Literal["media", "clear", "mark", "other"]
    pcm16: bytes = b""  # media: the audio decoded to PCM16LE at the stream's sample rate
    name: str | None = None  # mark: its name


@dataclass(frozen=True)
class StreamOpening:
    """The carrier's opening on a media socket, and what the handshake must make of it."""

    frames: tuple[Frame, ...]
    carrier_call_ref: str | None  # expected StreamStart.carrier_call_ref
    stream_id: str  # expected StreamStart.stream_id
    params: Mapping[str, str] = field(default_factory=dict)  # the socket URL's query parameters
    headers: Mapping[str, str] = field(default_factory=dict)  # the upgrade's headers (lower-case)
    account_id: str | None = None  # what an Agent Stream handshake must ask match_telephony for


@dataclass(frozen=True)
class MarkupTarget:
    """Where answer markup sends the carrier, read the way the carrier reads it."""

    url: str
    token: str | None
    status_url: str | None = None


@dataclass(frozen=True)
class Exchange:
    """One HTTP request the carrier documents for an action, and the carrier's canned answer to it.

    ``path`` is a regular expression the request's URL path must fully match; ``fields`` are the body
    fields (or, for GET, query fields) the request must carry with exactly these values (a list for a
    repeated field).
    """

    method: str
    path: str
    status: int
    body: Any = None  # JSON-serializable, or None for an empty answer
    fields: Mapping[str, str | list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class RestCase:
    """One REST action with its arguments, the requests it must make in order, and its outcome:
    ``expected`` (compared with ``==``; a dict is compared attribute by attribute against an object
    result) or ``error``, the ``CarrierError.code`` it must raise."""

    name: str
    action: RestAction
    args: tuple[Any, ...]
    exchanges: tuple[Exchange, ...]
    expected: Any = None
    error: str | None = None


# (url, credentials) -> the request as the carrier sends it, signed with those credentials.
SignedBuilder = Callable[[str, BaseModel], WebhookRequest]


@dataclass(frozen=True)
class ContractKit:
    """What one provider's fake supplies; a part is None when the provider lacks that capability."""

    provider: str
    credentials: BaseModel  # valid sample credentials for this carrier
    wrong_credentials: BaseModel | None = None  # same account, another secret: its signatures must not verify

    # webhook + verify
    inbound_webhook: SignedBuilder | None = None
    inbound_expect: Mapping[str, Any] = field(default_factory=dict)  # InboundCall attributes to compare
    # (url, credentials, carrier status word) -> a signed status callback
    status_webhook: Callable[[str, BaseModel, str], WebhookRequest] | None = None
    status_cases: tuple[tuple[str, str | None], ...] = ()  # (carrier word, normalized status or None)
    signed_upgrade: SignedBuilder | None = None  # a WebSocket upgrade, signed as the carrier signs it
    signature_headers: tuple[str, ...] = ()  # what "unsigned" removes
    # name -> an alteration of a signed request that its signature must no longer cover
    tamperings: Mapping[str, Callable[[WebhookRequest], WebhookRequest]] = field(default_factory=dict)
    read_markup: Callable[[Markup], MarkupTarget] | None = None
    read_refusal: Callable[[Markup], str] | None = None  # the text the caller hears

    # stream
    media_socket_opening: Callable[[str], StreamOpening] | None = None  # token -> opening
    agent_stream_opening: Callable[[], StreamOpening] | None = None
    media_frame: Callable[[bytes, int], Frame] | None = None  # (PCM16 of caller audio, seq) -> carrier frame
    parse_sent: Callable[[Frame], SentFrame] | None = None
    audio_sample: bytes = b""  # PCM16 that survives the carrier's codec unchanged (exact round trip)

    # rest
    rest_cases: tuple[RestCase, ...] = ()
    auth_header: str | None = None  # the Authorization header every REST request must carry
