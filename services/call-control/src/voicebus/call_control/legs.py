"""The leg registry: which carrier call each voicebus call is, kept by call-control alone.

Other services name a call by its voicebus call id; the carrier address (configuration, provider,
carrier call id) is written here once, when ingress registers an inbound leg or call-control dials
an outbound one, and read back for every later action (hangup, status). Carrier references therefore
never ride the bus after registration, and one service can refuse an action on another
organization's call.

The store is a JetStream KV bucket keyed by call id, so every replica sees the same legs and a
registration survives a call-control restart. Entries expire ``LEGS_TTL_S`` after their last write:
no call lasts that long, and the bucket never grows without bound.
"""

from __future__ import annotations

import time
from typing import Literal

import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, ValidationError

from voicebus.bus.subjects import Subjects

LEGS_TTL_S = 48 * 3600


def legs_bucket(subjects: Subjects) -> str:
    return f"{subjects.prefix.replace('-', '_')}_ctl_legs"


class Leg(BaseModel):
    model_config = ConfigDict(extra="ignore")

    call_id: str
    telephony_config_id: int
    organization_id: int
    run_id: int
    provider: str
    carrier_call_id: str
    direction: Literal["inbound", "outbound"]
    state: Literal["live", "ended"] = "live"
    created_at: float
    updated_at: float
    ended_at: float | None = None
    end_reason: str | None = None

    def same_address(self, other: Leg) -> bool:
        """Whether ``other`` names the same carrier call (a retried registration, not a conflict)."""
        return (self.telephony_config_id, self.organization_id, self.run_id, self.provider,
                self.carrier_call_id) == (other.telephony_config_id, other.organization_id, other.run_id,
                                          other.provider, other.carrier_call_id)


class LegConflict(Exception):
    """The call id already names another carrier call."""

    def __init__(self, existing: Leg) -> None:
        super().__init__(f"call {existing.call_id} already has a leg")
        self.existing = existing


class LegRegistry:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, call_id: str) -> Leg | None:
        try:
            entry = await self.kv.get(call_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        try:
            return Leg.model_validate_json(entry.value)
        except ValidationError:
            return None  # written by a newer, incompatible call-control: treat as absent, do not crash

    async def register(self, leg: Leg) -> Leg:
        """Store ``leg``; registering the same carrier call again is a no-op that returns the stored leg.

        Raises :class:`LegConflict` when the call id already names a different carrier call: a call
        id is minted once per call, so that is a confused (or hostile) caller, never a retry.
        """
        while True:
            try:
                await self.kv.create(leg.call_id, leg.model_dump_json().encode())
                return leg
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            existing = await self.get(leg.call_id)
            if existing is None:
                continue  # expired or deleted in between: try again
            if existing.same_address(leg):
                return existing
            raise LegConflict(existing)

    async def mark_ended(self, leg: Leg, reason: str) -> Leg:
        now = time.time()
        ended = leg.model_copy(update={"state": "ended", "ended_at": now, "updated_at": now, "end_reason": reason})
        await self.kv.put(leg.call_id, ended.model_dump_json().encode())
        return ended
