"""Calls waiting for their per-call media socket, in a JetStream KV bucket shared by every ingress replica.

Answer markup points the carrier at ``/api/v1/telephony/media/{call_id}`` with a token; the carrier may
open that socket on any replica, so what the socket needs (run, agent, lease, configuration, the
token's hash) lives here, not in the process that answered the webhook. The token itself is never
stored: only its SHA-256. It is single-use (claimed with a compare-and-set on the record's revision),
expires within a minute, and is bound to the call (the record is keyed by call id).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from typing import Literal

import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue
from pydantic import BaseModel

from voicebus.bus.events import kv_bucket
from voicebus.bus.subjects import Subjects

log = logging.getLogger("voicebus.ingress.pending")

BUCKET_TTL_S = 300.0  # records outlive their token so a late or reused token gets "already used/expired"


def bucket_name(subjects: Subjects) -> str:
    return f"{subjects.prefix.replace('-', '_')}_ingress_pending"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class PendingCall(BaseModel):
    call_id: str
    run_id: int
    organization_id: int
    agent_uuid: str
    provider: str
    telephony_config_id: int
    lease_id: str
    lease_ttl_s: float
    direction: Literal["inbound", "outbound"]
    caller_number: str | None = None
    called_number: str | None = None
    token_sha256: str
    expires_at: float
    used: bool = False


Claim = Literal["ok", "unknown", "expired", "used", "mismatch"]


class PendingCalls:
    def __init__(self, nc: NATS, subjects: Subjects) -> None:
        self.nc = nc
        self.subjects = subjects
        self._kv: KeyValue | None = None

    async def start(self) -> None:
        self._kv = await kv_bucket(self.nc, bucket_name(self.subjects), BUCKET_TTL_S)

    @property
    def kv(self) -> KeyValue:
        assert self._kv is not None, "PendingCalls.start() first"
        return self._kv

    async def put(self, call: PendingCall) -> None:
        await self.kv.put(call.call_id, call.model_dump_json().encode())

    async def get(self, call_id: str) -> PendingCall | None:
        try:
            entry = await self.kv.get(call_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        return PendingCall.model_validate_json(entry.value or b"{}")

    async def still_waiting(self, call_id: str) -> bool:
        call = await self.get(call_id)
        return call is not None and not call.used and call.expires_at > time.time()

    async def claim(self, call_id: str, token: str | None) -> tuple[Claim, PendingCall | None]:
        """Spend the token: only the first socket that presents it, within its lifetime, gets the call."""
        try:
            entry = await self.kv.get(call_id)
        except nats.js.errors.KeyNotFoundError:
            return "unknown", None
        call = PendingCall.model_validate_json(entry.value or b"{}")
        if not token or not hmac.compare_digest(token_hash(token), call.token_sha256):
            return "mismatch", call
        if call.used:
            return "used", call
        if call.expires_at <= time.time():
            return "expired", call
        used = call.model_copy(update={"used": True})
        try:
            await self.kv.update(call_id, used.model_dump_json().encode(), last=entry.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return "used", call  # another socket claimed it between our read and write
        return "ok", used


def describe(claim: Claim) -> str:
    return {
        "unknown": "No call is waiting for this media socket",
        "expired": "Media socket token expired",
        "used": "Media socket token already used",
        "mismatch": "Media socket token invalid",
        "ok": "",
    }[claim]
