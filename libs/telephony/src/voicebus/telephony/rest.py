"""The carrier REST actions call-control takes, as one Protocol every provider's client implements.

A client is built per request from the stored credentials (``RestFactory``): call-control keeps no
secret between requests. A provider without some action raises ``CarrierError("not_supported", ...)``
and declares what it has in :attr:`ProviderSpec.rest_actions`, so callers can refuse early.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol, runtime_checkable

import httpx
from pydantic import BaseModel

from voicebus.telephony.calls import BindResult, CallInfo, DialRequest, DialResult, HangupOutcome

RestAction = Literal["hangup", "confirm_call", "dial", "call_info", "bind_number", "transfer"]


@runtime_checkable
class CarrierRest(Protocol):
    async def hangup(self, carrier_call_id: str) -> HangupOutcome:
        """End the call; a call the carrier no longer knows (404) is ``already_ended``, not an error."""
        ...

    async def confirm_call(self, carrier_call_id: str) -> tuple[bool, int]:
        """Whether the carrier knows this live call on this account: ``(ok, http status)``."""
        ...

    async def dial(self, req: DialRequest) -> DialResult: ...

    async def call_info(self, carrier_call_id: str) -> CallInfo: ...

    async def bind_number(self, number: str, voice_url: str) -> BindResult: ...


# (credentials, the provider's API base URL, a shared HTTP client) -> a client for one request.
RestFactory = Callable[[BaseModel, str, httpx.AsyncClient], CarrierRest]
