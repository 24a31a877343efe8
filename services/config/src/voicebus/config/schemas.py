"""Request and response bodies of the admin REST API (runs use the bus's RunRecord as is)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from voicebus.bus.agent import AgentDefinition

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
ShortName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
MAX_CALL_LIMIT = 100_000


class _In(BaseModel):
    """Unknown fields are refused: a typo (``concurent_call_limit``) must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class OrganizationOut(BaseModel):
    id: int
    name: str
    concurrent_call_limit: int
    created_at: datetime


class OrganizationPatch(_In):
    name: Name | None = None
    concurrent_call_limit: int | None = Field(default=None, ge=0, le=MAX_CALL_LIMIT)


class ApiKeyCreate(_In):
    name: Name


class ApiKeyOut(BaseModel):
    id: int
    name: str
    prefix: str = Field(description="The first characters of the key, to tell keys apart.")
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The API key. Shown only in this response; store it now.")


class AgentCreate(_In):
    name: Name
    definition: AgentDefinition


class AgentUpdate(_In):
    name: Name | None = None
    definition: AgentDefinition | None = None


class AgentOut(BaseModel):
    uuid: str
    name: str
    draft_definition: AgentDefinition
    published_version: int | None
    published_definition: AgentDefinition | None
    created_at: datetime
    updated_at: datetime


class AgentVersionOut(BaseModel):
    version: int
    definition: AgentDefinition
    published_at: datetime


class TelephonyCreate(_In):
    provider: str = Field(min_length=1, max_length=32)
    name: ShortName
    credentials: dict[str, Any]


class TelephonyUpdate(_In):
    name: ShortName | None = None
    credentials: dict[str, Any] | None = None


class TelephonyOut(BaseModel):
    id: int
    provider: str
    name: str
    account_id: str
    credentials: dict[str, Any] = Field(description="Sensitive fields are masked.")
    created_at: datetime
    updated_at: datetime


class QuotaOut(BaseModel):
    concurrent_call_limit: int
    in_use: int


NumberIn = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class PhoneNumberCreate(_In):
    telephony_configuration_id: int
    number: NumberIn = Field(description="E.164; spaces, dashes and parentheses are removed.")
    agent_uuid: str = Field(min_length=1, max_length=64)
    is_active: bool = True


class PhoneNumberUpdate(_In):
    telephony_configuration_id: int | None = None
    number: NumberIn | None = None
    agent_uuid: str | None = Field(default=None, min_length=1, max_length=64)
    is_active: bool | None = None


class PhoneNumberOut(BaseModel):
    id: int
    telephony_configuration_id: int
    provider: str
    account_id: str = Field(description="The configuration's normalized carrier account id.")
    number: str
    agent_uuid: str
    is_active: bool
    created_at: datetime
    updated_at: datetime


class InitiateCall(_In):
    agent_uuid: str = Field(min_length=1, max_length=64)
    to: NumberIn = Field(description="The callee, E.164.")
    from_: NumberIn | None = Field(default=None, alias="from",
                                   description="Caller id, E.164; default: the carrier's choice for the account.")
    telephony_configuration_id: int | None = Field(
        default=None, description="Default: the organization's dial-capable configuration with the lowest id.")
    ring_timeout_s: int = Field(default=30, ge=5, le=120, description="How long the callee's phone rings.")


class InitiateCallOut(BaseModel):
    run_id: int
    run_name: str
    call_id: str = Field(description="voicebus's call id.")
    carrier_call_id: str
    from_: str = Field(serialization_alias="from")
    to: str
    state: str = Field(description="The run's state: 'created' until the callee answers.")
    carrier_status: str | None = None


class BindNumber(_In):
    voice_url: str | None = Field(default=None, max_length=2048, pattern=r"^https?://",
                                  description="Default: voicebus's inbound URL, {public}/api/v1/telephony/inbound/run.")
