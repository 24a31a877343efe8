"""Ingress settings (environment variables; see docs/ingress.md)."""

from __future__ import annotations

from pydantic import AliasChoices, Field

from voicebus.bus.messages import HEARTBEAT_TIMEOUT_S
from voicebus.kit import ServiceSettings


def _env(name: str, field: str) -> AliasChoices:
    return AliasChoices(name, field)


class IngressSettings(ServiceSettings):
    port: int = Field(default=8080, ge=0, le=65535, validation_alias=_env("VOICEBUS_INGRESS_PORT", "port"))
    handshake_timeout_s: float = Field(
        default=10.0, gt=0, validation_alias=_env("VOICEBUS_HANDSHAKE_TIMEOUT_S", "handshake_timeout_s"),
        description="Deadline for the carrier's opening messages (connected + start).",
    )
    offer_timeout_s: float = Field(
        default=5.0, gt=0, validation_alias=_env("VOICEBUS_OFFER_TIMEOUT_S", "offer_timeout_s"),
        description="How long to keep offering a call to the runner pool before refusing it with 1013.",
    )
    heartbeat_timeout_s: float = Field(
        default=HEARTBEAT_TIMEOUT_S, gt=0,
        validation_alias=_env("VOICEBUS_HEARTBEAT_TIMEOUT_S", "heartbeat_timeout_s"),
        description="Runner heartbeat silence after which the runner is presumed lost.",
    )
    resume_attempts: int = Field(
        default=3, ge=1, le=10, validation_alias=_env("VOICEBUS_RESUME_ATTEMPTS", "resume_attempts"),
        description="Offers a call may get in all: the first, then resumes on another runner after one is lost.",
    )
    rpc_timeout_s: float = Field(
        default=3.0, gt=0, validation_alias=_env("VOICEBUS_RPC_TIMEOUT_S", "rpc_timeout_s"),
        description="Timeout of each request to config and call-control.",
    )
    drain_timeout_s: float = Field(
        default=600.0, ge=0, validation_alias=_env("VOICEBUS_INGRESS_DRAIN_TIMEOUT_S", "drain_timeout_s"),
        description="On SIGTERM, how long live calls may continue before they are ended.",
    )
    public_url: str | None = Field(
        default=None, validation_alias=_env("VOICEBUS_PUBLIC_URL", "public_url"),
        description="The public base URL carriers reach ingress at (http(s)://host[:port]). Signatures cover the "
                    "URL the carrier called, and answer markup points at ws(s)://<this>/api/v1/telephony/media/...; "
                    "unset: the URL of each request as ingress sees it.",
    )
    media_token_ttl_s: float = Field(
        default=60.0, gt=0, le=60.0, validation_alias=_env("VOICEBUS_MEDIA_TOKEN_TTL_S", "media_token_ttl_s"),
        description="How long the single-use token of a per-call media socket stays valid (at most a minute).",
    )
