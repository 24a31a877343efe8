"""call-control settings, from the environment."""

from __future__ import annotations

from pydantic import AliasChoices, Field

from voicebus.kit import ServiceSettings
from voicebus.telephony.providers.cloudonix.rest import DEFAULT_API_URL


class CallControlSettings(ServiceSettings):
    port: int = Field(default=8083, validation_alias=AliasChoices("VOICEBUS_CALL_CONTROL_PORT", "port"))
    cloudonix_api_url: str = Field(
        default=DEFAULT_API_URL, validation_alias=AliasChoices("CLOUDONIX_API_URL", "cloudonix_api_url"),
        description="Base URL of the Cloudonix REST API (the simulator's stand-in in tests and the demo).",
    )
    carrier_timeout_s: float = Field(
        default=5.0, gt=0, validation_alias=AliasChoices("VOICEBUS_CARRIER_TIMEOUT_S", "carrier_timeout_s"))
    concurrency: int = Field(
        default=32, ge=1, validation_alias=AliasChoices("VOICEBUS_CALL_CONTROL_CONCURRENCY", "concurrency"),
        description="Requests handled at once per subject by one replica.",
    )
