"""End-to-end fixtures: the four services as separate processes on real NATS, Redis and PostgreSQL.

One stack per test session (start-up costs a few seconds, mostly the runner warming Piper and Silero).
Only the carriers are stood in for: the Cloudonix and Twilio cloud stand-ins and the carrier simulator
ship with the product. Timeouts are shortened through the services' own settings so refusals are fast.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlencode

import httpx
import pytest

from voicebus.bus.agent import demo_definition
from voicebus.cli.demo import create_org, find_run
from voicebus.cli.stack import Stack, StackConfig
from voicebus.simulator.cloudonix_api import RunningCloudonixApi, run_cloudonix_api
from voicebus.simulator.twilio.rest import RunningTwilioApi, run_twilio_api

T = TypeVar("T")
DOMAIN = "e2e.cloudonix.net"
NO_TOKEN_DOMAIN = "notoken.cloudonix.net"
TWILIO_SID = "AC" + "e2e0" * 8
TWILIO_NUMBER = "+15005550006"  # routed to the e2e agent (a phone number in config)
TWILIO_FROM = "+15005550010"  # the configuration's from_numbers (outbound caller id)
TERMINAL = {"completed", "failed"}


async def eventually(probe: Callable[[], Awaitable[T | None]], timeout: float, what: str) -> T:
    """Poll an external system (admin API, stand-in) until ``probe`` returns a value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.2)


@dataclass
class Org:
    id: int
    api_key: str
    admin: httpx.AsyncClient


@dataclass
class E2E:
    stack: Stack
    cloudonix: RunningCloudonixApi
    token: str
    org: Org
    agent_uuid: str
    telephony_config_id: int
    no_token_config_id: int
    limited_org_agent_uuid: str
    twilio: RunningTwilioApi
    twilio_token: str
    twilio_config_id: int

    def url(self, agent_uuid: str | None = None, **params: str) -> str:
        query = {"provider": "cloudonix", "Domain": DOMAIN, **params}
        query = {k: v for k, v in query.items() if v is not None}
        return f"{self.stack.ingress_ws_url}/api/v1/agent-stream/{agent_uuid or self.agent_uuid}?{urlencode(query)}"

    async def run_for_call(self, call_id: str, timeout: float = 20.0, terminal: bool = True) -> dict[str, Any]:
        return await find_run(self.org.admin, call_id, terminal=terminal, timeout=timeout)

    async def runs(self) -> list[dict[str, Any]]:
        resp = await self.org.admin.get("/api/v1/runs", params={"limit": 200})
        resp.raise_for_status()
        return list(resp.json())

    async def quota_in_use(self) -> int:
        resp = await self.org.admin.get("/api/v1/quota")
        resp.raise_for_status()
        return int(resp.json()["in_use"])

    async def wait_quota_free(self, timeout: float = 15.0) -> None:
        async def probe() -> bool | None:
            return True if await self.quota_in_use() == 0 else None

        await eventually(probe, timeout, "every quota slot to be released")


async def _agent(admin: httpx.AsyncClient) -> str:
    resp = await admin.post("/api/v1/agents", json={"name": "e2e agent", "definition": demo_definition().model_dump()})
    assert resp.status_code == 201, resp.text
    agent_uuid = resp.json()["uuid"]
    resp = await admin.post(f"/api/v1/agents/{agent_uuid}/publish")
    assert resp.status_code in (200, 201), resp.text
    return str(agent_uuid)


async def _tcfg(admin: httpx.AsyncClient, domain: str, token: str) -> int:
    resp = await admin.post("/api/v1/telephony-configurations", json={
        "provider": "cloudonix", "name": domain, "credentials": {"domain_id": domain, "bearer_token": token}})
    assert resp.status_code == 201, resp.text
    return int(resp.json()["id"])


async def _twilio(admin: httpx.AsyncClient, agent_uuid: str, token: str) -> int:
    resp = await admin.post("/api/v1/telephony-configurations", json={
        "provider": "twilio", "name": "e2e Twilio", "credentials": {
            "account_sid": TWILIO_SID, "auth_token": token, "from_numbers": [TWILIO_FROM]}})
    assert resp.status_code == 201, resp.text
    tcfg = int(resp.json()["id"])
    resp = await admin.post("/api/v1/phone-numbers", json={
        "telephony_configuration_id": tcfg, "number": TWILIO_NUMBER, "agent_uuid": agent_uuid})
    assert resp.status_code == 201, resp.text
    return tcfg


@pytest.fixture(scope="session")
async def e2e(nats_url: str, redis_url: str, postgres_url: str,
              tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[E2E]:
    token = uuid.uuid4().hex
    twilio_token = uuid.uuid4().hex
    home = tmp_path_factory.mktemp("stack")
    async with run_cloudonix_api({DOMAIN: token, NO_TOKEN_DOMAIN: "unused"}) as cloudonix, \
            run_twilio_api(TWILIO_SID, twilio_token, [TWILIO_NUMBER, TWILIO_FROM],
                           record_dir=home / "twilio") as twilio:
        cfg = StackConfig.free_ports(
            runners=2, home=home, nats_url=nats_url, redis_url=redis_url, database_url=postgres_url,
            subject_prefix=f"e2e{uuid.uuid4().hex[:8]}", runner_capacity=2,
            carrier_api_urls={"cloudonix": cloudonix.url, "twilio": twilio.url},
            extra_env={"VOICEBUS_HANDSHAKE_TIMEOUT_S": "2", "VOICEBUS_OFFER_TIMEOUT_S": "3",
                       "VOICEBUS_QUOTA_LEASE_TTL_S": "9", "VOICEBUS_REAPER_INTERVAL_S": "1"},
        )
        log = (home / "stack.log").open("w")
        stack = Stack(cfg, out=log, color=False)
        try:
            await asyncio.to_thread(stack.start_servers)
            await asyncio.to_thread(stack.start_services, 120.0)
            org = create_org(stack, "e2e org")
            limited = create_org(stack, "limited org", concurrent_calls=0)
            async with httpx.AsyncClient(base_url=stack.config_url, trust_env=False, timeout=10,
                                         headers={"Authorization": f"Bearer {org['api_key']}"}) as admin, \
                    httpx.AsyncClient(base_url=stack.config_url, trust_env=False, timeout=10,
                                      headers={"Authorization": f"Bearer {limited['api_key']}"}) as limited_admin:
                agent_uuid = await _agent(admin)
                tcfg = await _tcfg(admin, DOMAIN, token)
                no_token = await _tcfg(admin, NO_TOKEN_DOMAIN, "")
                limited_agent = await _agent(limited_admin)
                await _tcfg(limited_admin, DOMAIN, token)
                twilio_cfg = await _twilio(admin, agent_uuid, twilio_token)
                yield E2E(stack, cloudonix, token, Org(org["organization_id"], org["api_key"], admin),
                          agent_uuid, tcfg, no_token, limited_agent, twilio, twilio_token, twilio_cfg)
        finally:
            await asyncio.to_thread(stack.stop)
            log.close()
            print(f"e2e stack log: {home / 'stack.log'}")
