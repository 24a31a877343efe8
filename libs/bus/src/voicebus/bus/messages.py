"""Message schemas for every subject in :mod:`voicebus.bus.subjects` (contract version 1).

JSON everywhere except audio, which is raw PCM16LE on ``media.in``/``media.out`` with its sequence and
timestamp in NATS headers (see :mod:`voicebus.bus.media`).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from voicebus.bus.agent import AgentDefinition

CONTRACT_VERSION = 1

RunState = Literal["created", "running", "completed", "failed"]
TERMINAL_STATES: frozenset[str] = frozenset({"completed", "failed"})


def utcnow() -> datetime:
    return datetime.now(UTC)


class Msg(BaseModel):
    model_config = ConfigDict(extra="ignore")

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


# --------------------------------------------------------------------------- media format
class MediaFormat(Msg):
    """What rides ``media.in``/``media.out`` for one call: always PCM16LE mono, 20 ms frames."""

    encoding: Literal["pcm16le"] = "pcm16le"
    sample_rate: int = 8000
    channels: Literal[1] = 1
    frame_ms: int = 20

    @property
    def frame_bytes(self) -> int:
        return self.sample_rate * self.frame_ms // 1000 * 2


# --------------------------------------------------------------------------- event.in (ingress -> runner)
class DtmfEvent(Msg):
    type: Literal["dtmf"] = "dtmf"
    digit: str


class MarkAckEvent(Msg):
    type: Literal["mark"] = "mark"
    name: str


class CallerHangupEvent(Msg):
    """The carrier leg is gone (``stop`` or socket closed): the runner must stop, not hang up again."""

    type: Literal["hangup"] = "hangup"
    reason: str = "caller_hangup"


EventIn = Annotated[DtmfEvent | MarkAckEvent | CallerHangupEvent, Field(discriminator="type")]
event_in_adapter: TypeAdapter[EventIn] = TypeAdapter(EventIn)


# --------------------------------------------------------------------------- event.out (runner -> ingress)
class ClearEvent(Msg):
    """Barge-in: drop whatever audio the carrier still has buffered."""

    type: Literal["clear"] = "clear"


class MarkEvent(Msg):
    type: Literal["mark"] = "mark"
    name: str


class CloseEvent(Msg):
    """The runner is done with the call; ingress closes the carrier socket after this."""

    type: Literal["close"] = "close"
    reason: str
    state: Literal["completed", "failed"] = "completed"


EventOut = Annotated[ClearEvent | MarkEvent | CloseEvent, Field(discriminator="type")]
event_out_adapter: TypeAdapter[EventOut] = TypeAdapter(EventOut)


# --------------------------------------------------------------------------- heartbeat
HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_TIMEOUT_S = 1.5


class Heartbeat(Msg):
    runner_id: str
    seq: int
    turn: int = 0


# --------------------------------------------------------------------------- dispatch
class ResolvedAgent(Msg):
    agent_uuid: str
    organization_id: int
    name: str
    version: int | None = Field(description="Published version used, or None when only a draft exists.")
    definition_source: Literal["published", "draft"]
    definition: AgentDefinition


class CallOffer(Msg):
    call_id: str
    run_id: int
    organization_id: int
    provider: str
    agent: ResolvedAgent
    media: MediaFormat = Field(default_factory=MediaFormat)
    caller_number: str | None = None
    called_number: str | None = None
    resume: bool = Field(default=False, description="True when re-offered after the owning runner died.")
    attempt: int = 1


class OfferAccepted(Msg):
    call_id: str
    runner_id: str


# --------------------------------------------------------------------------- checkpoints (JetStream KV)
class CallCheckpoint(Msg):
    """Written after every turn into the checkpoint bucket, keyed by call id, so a runner can resume."""

    call_id: str
    run_id: int
    runner_id: str
    turn: int
    flow_node: str | None = None
    messages: list[dict[str, Any]] = Field(default_factory=list)
    gathered: dict[str, Any] = Field(default_factory=dict)
    updated_at: datetime = Field(default_factory=utcnow)


# --------------------------------------------------------------------------- config API (vb.cfg.*)
class AgentResolveRequest(Msg):
    agent_uuid: str


class TelephonyMatchRequest(Msg):
    organization_id: int
    provider: str
    account_id: str = Field(description="Provider account key, e.g. the Cloudonix domain.")


class TelephonyMatch(Msg):
    telephony_config_id: int
    provider: str
    name: str
    account_id: str
    has_credentials: bool = Field(description="False when a required secret (e.g. bearer_token) is empty.")


class TelephonyCredentialsRequest(Msg):
    telephony_config_id: int


class TelephonyCredentials(Msg):
    telephony_config_id: int
    organization_id: int
    provider: str
    credentials: dict[str, Any]


class RunCreate(Msg):
    organization_id: int
    agent_uuid: str
    name: str
    call_type: Literal["inbound", "outbound"]
    mode: str
    call_id: str | None = None
    agent_version: int | None = None
    definition_source: Literal["published", "draft"] = "published"
    initial_context: dict[str, Any] = Field(default_factory=dict)
    gathered_context: dict[str, Any] = Field(default_factory=dict)
    logs: dict[str, Any] = Field(default_factory=dict)
    quota_lease_id: str | None = None


class RunUpdate(Msg):
    """Partial update; dicts are merged key by key. A terminal run never changes state again."""

    run_id: int
    state: RunState | None = None
    end_reason: str | None = None
    telephony_configuration_id: int | None = None
    initial_context: dict[str, Any] | None = None
    gathered_context: dict[str, Any] | None = None
    logs: dict[str, Any] | None = None


class RunGetRequest(Msg):
    run_id: int


class RunRecord(Msg):
    id: int
    name: str
    organization_id: int
    agent_uuid: str
    call_id: str | None
    call_type: str
    mode: str
    state: RunState
    end_reason: str | None
    telephony_configuration_id: int | None
    agent_version: int | None
    definition_source: str
    initial_context: dict[str, Any]
    gathered_context: dict[str, Any]
    logs: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    updated_at: datetime
    quota_lease_id: str | None = None


class QuotaAcquireRequest(Msg):
    organization_id: int
    holder: str = Field(description="Who holds the slot (a call id); for diagnostics.")


class QuotaLease(Msg):
    lease_id: str
    organization_id: int
    ttl_s: float
    limit: int
    in_use: int


class QuotaLeaseRef(Msg):
    organization_id: int
    lease_id: str


class QuotaReleased(Msg):
    released: bool


# --------------------------------------------------------------------------- inbound routing (vb.cfg.inbound.route)
class InboundRouteRequest(Msg):
    """Which organization, configuration and agent answer a call to ``called_number`` on this account."""

    provider: str
    account_id: str
    called_number: str


class InboundRoute(Msg):
    organization_id: int
    telephony_config_id: int
    phone_number_id: int
    number: str = Field(description="The called number, E.164.")
    agent: ResolvedAgent


# --------------------------------------------------------------------------- call-control API (vb.ctl.*)
# Other services name a call by voicebus call id only; call-control's leg registry holds the carrier
# address of each leg (configuration, carrier call id). See docs/call-control.md.
class LegRegister(Msg):
    """Record a call's carrier leg; with ``confirm`` call-control first asks the carrier that the call
    exists on the configuration's account (Cloudonix session validation) and records it only then."""

    call_id: str
    run_id: int
    organization_id: int
    telephony_config_id: int
    carrier_call_id: str
    direction: Literal["inbound", "outbound"] = "inbound"
    confirm: bool = False


class LegRegistered(Msg):
    confirmed: bool
    status: int | None = None
    detail: str = ""


class VerifyRequest(Msg):
    """A carrier webhook or socket upgrade as it arrived, for call-control to check its signature."""

    telephony_config_id: int
    method: str
    url: str = Field(description="The public URL the carrier called; a credential when it holds a token.")
    headers: dict[str, str]
    body_b64: str = ""


class VerifyResult(Msg):
    valid: bool
    reason: str = ""
    replayed: bool = Field(default=False, description="A valid delivery already seen (same idempotency key).")


class HangupRequest(Msg):
    call_id: str
    run_id: int
    organization_id: int
    reason: str
    end_state: Literal["completed", "failed"] | None = Field(
        default="completed", description="If set, call-control ends the run with this state and reason."
    )


class HangupResult(Msg):
    outcome: Literal["hung_up", "already_ended", "no_leg"]
    status: int | None = None
    replayed: bool = Field(default=False, description="True when an earlier identical request already ran.")


class InitiateRequest(Msg):
    """Place an outbound call for an existing run; the callee's answer fetches markup from ingress."""

    call_id: str
    run_id: int
    organization_id: int
    telephony_config_id: int
    to_number: str
    from_number: str | None = None
    ring_timeout_s: int = Field(default=30, ge=5, le=120)


class InitiateResult(Msg):
    carrier_call_id: str
    from_number: str
    status: str | None = None


class CallInfoRequest(Msg):
    call_id: str
    organization_id: int


class CallInfoResult(Msg):
    status: str | None
    raw_status: str
    duration_s: int | None = None
    price: float | None = None
    price_unit: str | None = None


class BindNumberRequest(Msg):
    organization_id: int
    telephony_config_id: int
    number: str
    voice_url: str


class BindNumberResult(Msg):
    number: str
    number_sid: str
    voice_url: str


# --------------------------------------------------------------------------- lifecycle events (vb.evt.>)
class LifecycleEvent(Msg):
    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    call_id: str
    run_id: int
    organization_id: int
    source: str
    at: datetime = Field(default_factory=utcnow)


class CallStarted(LifecycleEvent):
    provider: str
    telephony_config_id: int | None = None


class CallAnswered(LifecycleEvent):
    runner_id: str


class CallEnded(LifecycleEvent):
    """Terminal. Published on ``call.ended`` (completed) or ``call.failed`` (failed); first one wins."""

    state: Literal["completed", "failed"]
    reason: str
    quota_lease_id: str | None = None


class CallHangup(LifecycleEvent):
    outcome: str
    status: int | None = None


class CallStatusEvent(LifecycleEvent):
    """A carrier status callback, verified and normalized (``status`` None: the carrier's word maps to
    none of the normalized statuses, ``raw_status`` keeps it). Config appends it to the run's log and
    ends a run the carrier reports over (busy, no-answer, failed, canceled, completed)."""

    status: str | None
    raw_status: str
    duration_s: int | None = None
    fields: dict[str, Any] = Field(default_factory=dict)
