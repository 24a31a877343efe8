"""Admission: what must exist before a call may run (provider, agent, quota slot, run), for every entry
path. Nothing is allocated before the checks that can refuse for free have passed; once a slot is
taken, the caller owns releasing it (a :class:`~voicebus.ingress.live_call.lease.LeaseKeeper`).
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Mapping

from voicebus.bus.messages import ResolvedAgent
from voicebus.ingress.bus import BusClient
from voicebus.ingress.close_codes import CLOSE_INTERNAL, CLOSE_POLICY, Refusal
from voicebus.telephony import ProviderSpec, get_spec
from voicebus.telephony.stream import StreamHandshake, echo_safe

log = logging.getLogger("voicebus.ingress.admission")

MAX_PARAM_LEN = 256


def new_call_id() -> str:
    return uuid.uuid4().hex


def run_name(prefix: str) -> str:
    """``WR-AGS-12345678`` (Agent Stream), ``WR-TEL-IN-...`` (inbound webhook): as the seed names runs."""
    return f"{prefix}-{secrets.randbelow(10**8):08d}"


def param(params: Mapping[str, str], name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    value = value.strip()[:MAX_PARAM_LEN]
    return value or None


def agent_stream_provider(params: Mapping[str, str]) -> tuple[ProviderSpec, StreamHandshake]:
    """The provider named by ``?provider=`` and its Agent Stream handshake (1008 / 1011 otherwise)."""
    raw = (params.get("provider") or "").strip()
    if not raw:
        raise Refusal(CLOSE_POLICY, "Missing provider query parameter")
    spec = get_spec(raw.lower())
    if spec is None:
        raise Refusal(CLOSE_POLICY, f"Unknown provider: {echo_safe(raw)}")
    if spec.stream is None or spec.stream.agent_stream is None:
        raise Refusal(CLOSE_INTERNAL, f"Agent Stream is not supported for provider {spec.name}")
    return spec, spec.stream.agent_stream


async def resolve_agent(bus: BusClient, agent_path: str) -> ResolvedAgent:
    """The agent named by a URL path segment (a credential: never logged)."""
    try:
        agent_uuid = str(uuid.UUID(agent_path))
    except ValueError as e:
        raise Refusal(CLOSE_POLICY, "Agent not found") from e
    return await bus.resolve_agent(agent_uuid)
