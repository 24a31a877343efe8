"""Settings shared by every service. Server URLs use the conventional unprefixed names."""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    nats_url: str = Field(default="nats://127.0.0.1:4222", validation_alias=AliasChoices("NATS_URL", "nats_url"))
    subject_prefix: str = Field(
        default="vb", validation_alias=AliasChoices("VOICEBUS_SUBJECT_PREFIX", "subject_prefix"),
        description="Prefix of every NATS subject, stream and bucket; lets stacks share one NATS.",
    )
    http_host: str = Field(default="127.0.0.1", validation_alias=AliasChoices("VOICEBUS_HTTP_HOST", "http_host"))
    instance_id: str | None = Field(default=None, validation_alias=AliasChoices("VOICEBUS_INSTANCE_ID", "HOSTNAME"))
