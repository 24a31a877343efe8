"""call-control on real NATS, with the Cloudonix stand-in on 127.0.0.1 and a fake config responder."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import ClassVar

import httpx
import nats
import pytest
from nats.aio.client import Client as NATS

from voicebus.bus.messages import TelephonyCredentials, TelephonyCredentialsRequest
from voicebus.bus.rpc import BusError, serve
from voicebus.bus.subjects import CFG_TELEPHONY_CREDENTIALS, CONFIG_QUEUE, Subjects
from voicebus.call_control.carriers import Carriers, CloudonixAdapter
from voicebus.call_control.service import CallControlService, actions_bucket
from voicebus.simulator.cloudonix_api import RunningCloudonixApi, run_cloudonix_api

DOMAIN = "acme.cloudonix.net"
TOKEN = "tok-3c1f0a9e5b7d"
ORG = 7
CONFIG_ID = 11


@dataclass
class FakeConfig:
    """Serves ``cfg.telephony.credentials`` from a dict the test can change, and counts requests."""

    configs: dict[int, TelephonyCredentials] = field(default_factory=dict)
    requests: int = 0

    async def handle(self, req: TelephonyCredentialsRequest) -> TelephonyCredentials:
        self.requests += 1
        found = self.configs.get(req.telephony_config_id)
        if found is None:
            raise BusError("not_found", f"telephony configuration {req.telephony_config_id} not found")
        return found


@dataclass
class Stack:
    ORG: ClassVar[int] = ORG
    CONFIG_ID: ClassVar[int] = CONFIG_ID
    TOKEN: ClassVar[str] = TOKEN

    nc: NATS
    subjects: Subjects
    cloudonix: RunningCloudonixApi
    config: FakeConfig
    http: httpx.AsyncClient
    make_service: Callable[..., CallControlService]
    service: CallControlService

    def session(self, name: str) -> str:
        self.cloudonix.state.add_session(DOMAIN, name, "+15551230001", "+15551230002")
        return name

    def deletes(self, session: str) -> int:
        return sum(1 for r in self.cloudonix.state.sessions[session].requests if r.method == "DELETE")


@pytest.fixture
async def stack(nats_url: str, subject_prefix: str) -> AsyncIterator[Stack]:
    subjects = Subjects(prefix=subject_prefix)
    nc = await nats.connect(nats_url)
    config = FakeConfig({CONFIG_ID: TelephonyCredentials(
        telephony_config_id=CONFIG_ID, organization_id=ORG, provider="cloudonix",
        credentials={"domain_id": "acme", "bearer_token": TOKEN})})
    cfg_sub = await serve(nc, subjects.cfg(CFG_TELEPHONY_CREDENTIALS), TelephonyCredentialsRequest, config.handle,
                          queue=CONFIG_QUEUE)
    services: list[CallControlService] = []
    async with run_cloudonix_api({DOMAIN: TOKEN}) as cloudonix, httpx.AsyncClient(trust_env=False) as http:

        def make_service(api_url: str | None = None, **kw: object) -> CallControlService:
            carriers = Carriers({"cloudonix": CloudonixAdapter(api_url or cloudonix.url, http, timeout_s=2.0,
                                                               backoff_s=0.05)})
            svc = CallControlService(nc, subjects, carriers, **kw)  # type: ignore[arg-type]
            services.append(svc)
            return svc

        service = make_service(instance_id="cc-a")
        await service.start()
        try:
            yield Stack(nc, subjects, cloudonix, config, http, make_service, service)
        finally:
            for svc in services:
                await svc.stop()
            await cfg_sub.unsubscribe()
            js = nc.jetstream()
            with contextlib.suppress(Exception):
                await js.delete_stream(subjects.events_stream)
            with contextlib.suppress(Exception):
                await js.delete_key_value(actions_bucket(subjects))
            await nc.close()
