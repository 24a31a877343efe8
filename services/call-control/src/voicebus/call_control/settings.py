"""call-control settings, from the environment."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import NoDecode

from voicebus.kit import ServiceSettings
from voicebus.telephony import parse_api_urls

DEFAULT_PUBLIC_URL = "http://127.0.0.1:8080"


class CallControlSettings(ServiceSettings):
    port: int = Field(default=8083, validation_alias=AliasChoices("VOICEBUS_CALL_CONTROL_PORT", "port"))
    # NoDecode: the value is ours to parse (JSON object *or* name=url list), not pydantic-settings' JSON.
    carrier_api_urls: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, validation_alias=AliasChoices("VOICEBUS_CARRIER_API_URLS", "carrier_api_urls"),
        description="Carrier REST base URLs by provider (JSON object or twilio=http://..,cloudonix=http://..); "
                    "a provider not named uses its default API URL.",
    )
    public_url: str = Field(
        default=DEFAULT_PUBLIC_URL, validation_alias=AliasChoices("VOICEBUS_PUBLIC_URL", "public_url"),
        description="Ingress's public base URL: outbound calls' answer and status callback URLs are built on it.",
    )
    concurrency: int = Field(
        default=32, ge=1, validation_alias=AliasChoices("VOICEBUS_CALL_CONTROL_CONCURRENCY", "concurrency"),
        description="Requests handled at once per subject by one replica.",
    )

    @field_validator("carrier_api_urls", mode="before")
    @classmethod
    def _api_urls(cls, value: Any) -> dict[str, str]:
        try:
            return parse_api_urls(value)
        except ValueError as e:  # json.JSONDecodeError is a ValueError too
            raise ValueError(f"VOICEBUS_CARRIER_API_URLS: {e}") from e

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"VOICEBUS_PUBLIC_URL must be an http(s) base URL such as {DEFAULT_PUBLIC_URL}, "
                             f"got {value!r}")
        return value.strip().rstrip("/")


def load_settings() -> CallControlSettings:
    """The settings, or ``SystemExit`` with one line per bad variable (not a pydantic traceback)."""
    try:
        return CallControlSettings()
    except ValidationError as e:
        lines = [str(err.get("msg", "")).removeprefix("Value error, ") for err in e.errors()]
        raise SystemExit("call-control: invalid settings: " + "; ".join(lines)) from None
