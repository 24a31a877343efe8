"""Carriers as call-control sees them: a provider name and stored credentials in, a REST client out.

Everything provider-specific comes from the registry (:func:`voicebus.telephony.get_spec`): the
credentials schema, the REST client factory and the actions it implements, the verifier. This module
only turns "not there" into a specific ``not_supported`` and a carrier's failure into the bus error
other services branch on, so adding a carrier never touches call-control.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from voicebus.bus.rpc import BusError
from voicebus.telephony import api_url, get_spec
from voicebus.telephony.calls import CarrierError
from voicebus.telephony.registry import ProviderSpec
from voicebus.telephony.rest import CarrierRest, RestAction

T = TypeVar("T")


def spec_of(provider: str) -> ProviderSpec:
    spec = get_spec(provider)
    if spec is None:
        raise BusError("not_supported", f"unknown provider {provider!r}")
    return spec


def parse_credentials(spec: ProviderSpec, credentials: Mapping[str, Any]) -> BaseModel:
    try:
        return spec.credentials_model.model_validate(dict(credentials))
    except ValidationError as e:
        fields = ", ".join(".".join(str(p) for p in err["loc"]) or "credentials" for err in e.errors()[:5])
        # Only field names: the values may be secrets.
        raise BusError("carrier_auth_failed",
                       f"the stored {spec.display_name} credentials are invalid ({fields})") from e


async def carrier_call(coro: Awaitable[T]) -> T:
    """Await a carrier action; its ``CarrierError`` becomes a ``BusError`` with the same code and message.

    The carrier's message is safe to pass on (``CarrierError`` promises it holds no secret).
    """
    try:
        return await coro
    except CarrierError as e:
        raise BusError(e.code, e.message) from e


class Carriers:
    """Builds one REST client per request from the stored credentials; keeps no secret in between."""

    def __init__(self, http: httpx.AsyncClient, api_urls: Mapping[str, str] | None = None) -> None:
        """``api_urls`` overrides providers' default API base URLs (``VOICEBUS_CARRIER_API_URLS``)."""
        self.http = http
        self.api_urls = dict(api_urls or {})

    def rest(self, provider: str, credentials: Mapping[str, Any],
             action: RestAction) -> tuple[ProviderSpec, BaseModel, CarrierRest]:
        """The provider's client for ``action``, refused early when the provider does not have it."""
        spec = spec_of(provider)
        if spec.rest is None or action not in spec.rest_actions:
            raise BusError("not_supported", f"{spec.display_name} cannot {action}")
        creds = parse_credentials(spec, credentials)
        try:
            client = spec.rest(creds, api_url(spec.name, self.api_urls), self.http)
        except CarrierError as e:  # e.g. a configuration stored without its API token
            raise BusError(e.code, e.message) from e
        return spec, creds, client
