"""What the admin API asks a carrier through call-control: a call's status and cost, and binding a
number's inbound URL to voicebus. Config holds no carrier client; call-control does the REST call with
the stored credentials and answers with carrier-neutral results.
"""

from __future__ import annotations

from nats.aio.client import Client as NATS

from voicebus.bus import subjects as sj
from voicebus.bus.messages import BindNumberRequest, BindNumberResult, CallInfoRequest, CallInfoResult
from voicebus.bus.rpc import BusError, request
from voicebus.bus.subjects import Subjects
from voicebus.config.errors import ConfigError, NotFound
from voicebus.config.store import Store

CTL_TIMEOUT_S = 15.0
INBOUND_PATH = "/api/v1/telephony/inbound/run"


class CarrierRefused(ConfigError):
    status = 502
    code = "carrier_refused"


class CarrierUnavailable(ConfigError):
    status = 503
    code = "carrier_unavailable"
    headers = {"Retry-After": "5"}


def _translate(e: BusError) -> ConfigError:
    if e.code == "not_found":
        return NotFound(e.message)
    if e.code in ("not_supported", "invalid_request", "carrier_invalid_number"):
        err = ConfigError(e.message)
        err.code = e.code
        return err
    if e.code == "carrier_auth_failed":
        return CarrierRefused("the carrier rejected the configuration's credentials")
    return CarrierUnavailable(f"call-control or the carrier is unavailable ({e.code}); retry")


class CarrierQueries:
    def __init__(self, nc: NATS, subjects: Subjects, store: Store, public_url: str) -> None:
        self.nc = nc
        self.subjects = subjects
        self.store = store
        self.public_url = public_url.rstrip("/")

    async def call_info(self, organization_id: int, run_id: int) -> CallInfoResult:
        run = await self.store.get_run(run_id, organization_id)
        if not run.call_id:
            raise NotFound(f"run {run_id} has no call")
        try:
            return await request(self.nc, self.subjects.ctl(sj.CTL_CALL_INFO),
                                 CallInfoRequest(call_id=run.call_id, organization_id=organization_id),
                                 CallInfoResult, timeout=CTL_TIMEOUT_S)
        except BusError as e:
            raise _translate(e) from e

    async def bind(self, organization_id: int, number_id: int, voice_url: str | None) -> BindNumberResult:
        """Point the number's inbound webhook at voicebus (``{public}/api/v1/telephony/inbound/run``)."""
        phone = await self.store.get_phone_number(organization_id, number_id)
        try:
            return await request(self.nc, self.subjects.ctl(sj.CTL_BIND_NUMBER), BindNumberRequest(
                organization_id=organization_id, telephony_config_id=phone.telephony_configuration_id,
                number=phone.number, voice_url=voice_url or self.public_url + INBOUND_PATH),
                BindNumberResult, timeout=CTL_TIMEOUT_S)
        except BusError as e:
            raise _translate(e) from e
