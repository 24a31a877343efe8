"""Signature verification: does this webhook or socket upgrade really come from the carrier account?

Only call-control runs verifiers (it is the one service that holds carrier secrets); ingress forwards
the :class:`~voicebus.telephony.webhook.WebhookRequest` over the bus. Every verifier fails closed: a
missing header, a malformed one, a stale timestamp or any exception is a refusal with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pydantic import BaseModel

from voicebus.telephony.webhook import WebhookRequest


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""  # why it was refused; safe to log and to return (never echoes a secret)
    replay_key: str | None = None  # set when the scheme identifies a delivery (nonce, idempotency token)

    @classmethod
    def refuse(cls, reason: str) -> Verdict:
        return cls(False, reason)


@runtime_checkable
class SignatureVerifier(Protocol):
    def verify(self, req: WebhookRequest, credentials: BaseModel, *, now: float) -> Verdict:
        """``now`` is the Unix time to judge timestamps against (a parameter so tests can move it)."""
        ...
