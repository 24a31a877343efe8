"""Carrier adapters: the REST actions call-control can take, per provider.

The registry says which providers exist and how their credentials look; this module says which of
them call-control can act on. A provider that is registered (config can store it) but has no adapter
here answers ``not_supported``, so adding REST support for a carrier is one class and one table entry.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from voicebus.bus.rpc import BusError
from voicebus.telephony import get_spec
from voicebus.telephony.providers.cloudonix.config import CloudonixCredentials
from voicebus.telephony.providers.cloudonix.rest import CarrierError, CloudonixClient, HangupOutcome

T = TypeVar("T")


class CarrierAdapter(Protocol):
    async def validate_session(self, credentials: BaseModel, session: str) -> tuple[bool, int]: ...

    async def hangup(self, credentials: BaseModel, call_ref: str) -> tuple[HangupOutcome, int]: ...


class CloudonixAdapter:
    def __init__(self, api_url: str, http: httpx.AsyncClient, **client_kw: Any) -> None:
        """``client_kw`` goes to :class:`CloudonixClient` (timeouts, retries, budgets)."""
        self.api_url = api_url
        self._http = http
        self._kw = client_kw

    def _client(self, creds: CloudonixCredentials) -> CloudonixClient:
        if not creds.bearer_token:
            raise BusError("carrier_auth_failed",
                           f"the Cloudonix configuration for {creds.domain_id} has no bearer_token")
        return CloudonixClient(self.api_url, creds.bearer_token, self._http, **self._kw)

    async def validate_session(self, credentials: BaseModel, session: str) -> tuple[bool, int]:
        assert isinstance(credentials, CloudonixCredentials)
        return await _carrier(self._client(credentials).validate_session(credentials.domain_id, session))

    async def hangup(self, credentials: BaseModel, call_ref: str) -> tuple[HangupOutcome, int]:
        assert isinstance(credentials, CloudonixCredentials)
        return await _carrier(self._client(credentials).hangup(credentials.domain_id, call_ref))


async def _carrier(coro: Awaitable[T]) -> T:
    """Turn a carrier failure into the bus error other services branch on."""
    try:
        return await coro
    except CarrierError as e:
        raise BusError(e.code, e.message) from e


class Carriers:
    """Provider name -> adapter, with the registry as the source of truth for what a provider is."""

    def __init__(self, adapters: dict[str, CarrierAdapter]) -> None:
        self._adapters = adapters

    def resolve(self, provider: str, credentials: dict[str, Any]) -> tuple[CarrierAdapter, BaseModel]:
        spec = get_spec(provider)
        if spec is None:
            raise BusError("not_supported", f"unknown provider {provider!r}")
        adapter = self._adapters.get(spec.name)
        if adapter is None:
            raise BusError("not_supported", f"call-control has no REST support for {spec.display_name} yet")
        try:
            creds = spec.credentials_model.model_validate(credentials)
        except ValidationError as e:
            fields = ", ".join(".".join(str(p) for p in err["loc"]) or "credentials" for err in e.errors()[:5])
            # Only field names: the values may be secrets.
            raise BusError("carrier_auth_failed",
                           f"the stored {spec.display_name} credentials are invalid ({fields})") from e
        return adapter, creds
