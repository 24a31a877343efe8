"""``POST /api/v1/telephony/initiate-call`` against a fake ``{prefix}.ctl.initiate`` served on real NATS
(call-control itself is tested in its own service), and the lease kept while the callee's phone rings."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from voicebus.bus import subjects as sj
from voicebus.bus.agent import demo_definition
from voicebus.bus.events import publish_event
from voicebus.bus.messages import (
    CallStatusEvent,
    HangupRequest,
    HangupResult,
    InitiateRequest,
    InitiateResult,
    RunCreate,
    RunUpdate,
)
from voicebus.bus.rpc import BusError, serve
from voicebus.config import ConfigService
from voicebus.config.outbound import AUTH_FAILED, NO_DIAL_CONFIGURATION
from voicebus.config.reaper import LEASE_EXPIRED_REASON
from voicebus.telephony import registry
from voicebus.telephony.registry import ProviderSpec, UIField

TOKEN = "dial-secret-token-abcd9876"
CARRIER_FROM = "+15005550006"


class DialCredentials(BaseModel):
    account: str
    token: str = ""


def _no_rest(*_a: Any) -> Any:
    raise AssertionError("config never builds a carrier REST client")


@pytest.fixture(scope="module")
def dial_provider() -> Any:
    """A dial-capable provider of this test module only (the real ones are other packages' business)."""
    spec = registry.register(ProviderSpec(
        name=f"testdial{uuid.uuid4().hex[:6]}", display_name="Test dialer", credentials_model=DialCredentials,
        ui_fields=(UIField("account", "Account"), UIField("token", "Token", type="password", sensitive=True)),
        account_id_field="account", rest=_no_rest, rest_actions=frozenset({"dial", "hangup"})))
    yield spec.name
    registry._REGISTRY.pop(spec.name, None)


@pytest.fixture(params=["sqlite", "postgres"])
def own_db(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    return sqlite_url if request.param == "sqlite" else request.getfixturevalue("pg_databases").create()


@pytest.fixture
async def svc(start_service: Callable[..., Any], own_db: str) -> AsyncIterator[ConfigService]:
    async with start_service(own_db, consumer=True, reaper=False) as s:
        yield s


class FakeCallControl:
    """Answers ``ctl.initiate`` by the number called: ``outcomes[to_number]`` is a BusError to raise, the
    string "hang" (never answer), or absent (place the call)."""

    def __init__(self) -> None:
        self.requests: list[InitiateRequest] = []
        self.hangups: list[HangupRequest] = []
        self.outcomes: dict[str, BusError | str] = {}
        self.hangup_seen = asyncio.Event()
        self._release = asyncio.Event()

    async def initiate(self, req: InitiateRequest) -> InitiateResult:
        self.requests.append(req)
        outcome = self.outcomes.get(req.to_number)
        if isinstance(outcome, BusError):
            raise outcome
        if outcome == "hang":
            await self._release.wait()
        return InitiateResult(carrier_call_id=f"CA{req.run_id:08d}", from_number=req.from_number or CARRIER_FROM,
                              status="queued")

    async def hangup(self, req: HangupRequest) -> HangupResult:
        self.hangups.append(req)
        self.hangup_seen.set()
        return HangupResult(outcome="hung_up")

    def release(self) -> None:
        self._release.set()


@pytest.fixture
async def ctl(svc: ConfigService) -> AsyncIterator[FakeCallControl]:
    fake = FakeCallControl()
    subs = [await serve(svc.nc, svc.subjects.ctl(sj.CTL_INITIATE), InitiateRequest, fake.initiate, concurrency=8),
            await serve(svc.nc, svc.subjects.ctl(sj.CTL_HANGUP), HangupRequest, fake.hangup)]
    await svc.nc.flush()
    yield fake
    fake.release()
    for sub in subs:
        await sub.unsubscribe()


async def setup_org(svc: ConfigService, helpers: Any, provider: str, limit: int | None = None) -> tuple[Any, str, int]:
    org = await helpers.new_org(svc, "Dialer", limit=limit)
    agent = await svc.store.create_agent(org.id, "caller", demo_definition())
    cfg = await svc.store.create_telephony(org.id, provider, "out", {"account": "acct-1", "token": TOKEN})
    return org, agent.uuid, cfg.id


async def initiate(client: httpx.AsyncClient, org: Any, **body: Any) -> httpx.Response:
    return await client.post("/api/v1/telephony/initiate-call", headers=org.headers, json=body)


# ------------------------------------------------------------------------------------------ success
async def test_initiate_call_places_the_call(client: httpx.AsyncClient, svc: ConfigService, ctl: FakeCallControl,
                                             dial_provider: str, helpers: Any) -> None:
    org, agent, cfg_id = await setup_org(svc, helpers, dial_provider)
    r = await initiate(client, org, agent_uuid=agent, to="+1 (415) 555-0100")
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) == {"run_id", "run_name", "call_id", "carrier_call_id", "from", "to", "state", "carrier_status"}
    assert re.fullmatch(r"WR-TEL-OUT-\d{8}", body["run_name"]) and re.fullmatch(r"[0-9a-f]{32}", body["call_id"])
    assert (body["to"], body["from"], body["state"]) == ("+14155550100", CARRIER_FROM, "created")
    assert body["carrier_call_id"] == f"CA{body['run_id']:08d}"
    assert TOKEN not in r.text

    [req] = ctl.requests
    assert (req.call_id, req.run_id, req.organization_id, req.telephony_config_id, req.to_number,
            req.from_number, req.ring_timeout_s) == (body["call_id"], body["run_id"], org.id, cfg_id,
                                                     "+14155550100", None, 30)
    run = await svc.store.get_run(body["run_id"], org.id)
    assert (run.call_type, run.mode, run.state, run.name, run.call_id) == \
        ("outbound", dial_provider, "created", body["run_name"], body["call_id"])
    assert run.telephony_configuration_id == cfg_id
    assert run.initial_context == {"called_number": "+14155550100", "caller_number": CARRIER_FROM,
                                   "direction": "outbound", "provider": dial_provider,
                                   "telephony_configuration_id": cfg_id}
    assert run.gathered_context == {"call_id": body["carrier_call_id"]}
    assert run.quota_lease_id is not None and run.quota_lease_id in await svc.quota.live_leases(org.id)
    assert svc.outbound.ringing.holding(run.id)
    # The admin API's run record carries the lease too (ingress reads it when the callee answers).
    api_run = (await client.get(f"/api/v1/runs/{run.id}", headers=org.headers)).json()
    assert api_run["quota_lease_id"] == run.quota_lease_id

    # An explicit caller id goes to call-control and into the run.
    r = await initiate(client, org, agent_uuid=agent, to="+14155550101", **{"from": "+1 500 555 0001"},
                       ring_timeout_s=12)
    assert r.status_code == 201 and r.json()["from"] == "+15005550001"
    assert (ctl.requests[-1].from_number, ctl.requests[-1].ring_timeout_s) == ("+15005550001", 12)
    assert (await svc.store.get_run(r.json()["run_id"])).initial_context["caller_number"] == "+15005550001"


async def test_configuration_choice(client: httpx.AsyncClient, svc: ConfigService, ctl: FakeCallControl,
                                    dial_provider: str, helpers: Any) -> None:
    org = await helpers.new_org(svc, "Chooser")
    agent = (await svc.store.create_agent(org.id, "a", demo_definition())).uuid
    r = await initiate(client, org, agent_uuid=agent, to="+14155550100")
    assert r.status_code == 400 and r.json()["detail"] == NO_DIAL_CONFIGURATION
    cx = await svc.store.create_telephony(org.id, "cloudonix", "cx", {"domain_id": "acme", "bearer_token": "t"})
    r = await initiate(client, org, agent_uuid=agent, to="+14155550100")
    assert r.status_code == 400 and r.json()["detail"] == NO_DIAL_CONFIGURATION  # Cloudonix has no "dial"
    r = await initiate(client, org, agent_uuid=agent, to="+14155550100", telephony_configuration_id=cx.id)
    assert r.status_code == 400 and "provider 'cloudonix'" in r.json()["detail"] and "cannot place calls" in \
        r.json()["detail"]

    second = await svc.store.create_telephony(org.id, dial_provider, "b", {"account": "acct-b", "token": TOKEN})
    first_id = second.id
    third = await svc.store.create_telephony(org.id, dial_provider, "c", {"account": "acct-c", "token": TOKEN})
    r = await initiate(client, org, agent_uuid=agent, to="+14155550100")
    assert r.status_code == 201 and ctl.requests[-1].telephony_config_id == first_id  # the lowest dial-capable id
    r = await initiate(client, org, agent_uuid=agent, to="+14155550100", telephony_configuration_id=third.id)
    assert r.status_code == 201 and ctl.requests[-1].telephony_config_id == third.id

    other = await helpers.new_org(svc, "Other")
    theirs = await svc.store.create_telephony(other.id, dial_provider, "x", {"account": "acct-x", "token": TOKEN})
    r = await initiate(client, org, agent_uuid=agent, to="+14155550100", telephony_configuration_id=theirs.id)
    assert r.status_code == 404 and f"telephony configuration {theirs.id} not found" in r.json()["detail"]
    r = await initiate(client, other, agent_uuid=agent, to="+14155550100")
    assert r.status_code == 404 and f"agent {agent} not found" in r.json()["detail"]  # not their agent
    r = await initiate(client, org, agent_uuid=agent, to="415-555-0100")
    assert r.status_code == 422 and r.json()["message"].startswith("to: '415-555-0100' is not an E.164 number")
    r = await initiate(client, org, agent_uuid=agent, to="+14155550100", **{"from": "+0"})
    assert r.status_code == 422 and r.json()["message"].startswith("from: '+0' is not an E.164 number")
    r = await initiate(client, org, agent_uuid=agent, to="+14155550100", ring_timeout_s=1)
    assert r.status_code == 422 and "ring_timeout_s" in r.json()["message"]
    assert (await client.post("/api/v1/telephony/initiate-call", json={"agent_uuid": agent, "to": "+1415555"})
            ).status_code == 401
    assert len(ctl.requests) == 2  # refused requests never reached call-control


# ------------------------------------------------------------------------------------------ failures
FAILURES = [
    ("carrier_invalid_number", "The 'To' number +14155550999 is not a valid phone number.", 400, False),
    ("carrier_auth_failed", "Twilio answered 401 Authenticate", 502, False),
    ("not_supported", "this carrier cannot dial numbers of that country", 400, False),
    ("carrier_error", "carrier answered 500 after 2 attempts", 503, True),
]


@pytest.mark.parametrize(("code", "message", "status", "retryable"), FAILURES)
async def test_carrier_refusals(client: httpx.AsyncClient, svc: ConfigService, ctl: FakeCallControl,
                                dial_provider: str, helpers: Any, code: str, message: str, status: int,
                                retryable: bool) -> None:
    org, agent, _cfg = await setup_org(svc, helpers, dial_provider)
    ctl.outcomes["+14155550999"] = BusError(code, message)
    r = await initiate(client, org, agent_uuid=agent, to="+14155550999")
    assert r.status_code == status, r.text
    body = r.json()
    assert (body["code"], body["retryable"]) == (code, retryable)
    assert (r.headers.get("retry-after") is not None) == retryable
    if code == "carrier_auth_failed":
        assert body["detail"].startswith(AUTH_FAILED)
    else:
        assert message in body["detail"]
    assert TOKEN not in r.text
    run = await svc.store.get_run(body["run_id"], org.id)
    assert (run.state, run.end_reason, run.call_type) == ("failed", f"{code}: {message}", "outbound")
    assert await svc.quota.in_use(org.id) == 0  # the lease went with the call
    assert not svc.outbound.ringing.holding(run.id)


async def test_call_control_down_or_silent(client: httpx.AsyncClient, svc: ConfigService, dial_provider: str,
                                           helpers: Any, ctl: FakeCallControl) -> None:
    org, agent, _cfg = await setup_org(svc, helpers, dial_provider)
    # Silent: call-control got the request and never answered. The run fails, and a hangup makes sure
    # no call rings for it should call-control dial late.
    svc.outbound.initiate_timeout_s = 0.5
    ctl.outcomes["+14155550111"] = "hang"
    r = await initiate(client, org, agent_uuid=agent, to="+14155550111")
    assert r.status_code == 503 and r.json()["code"] == "timeout" and r.json()["retryable"] is True
    assert r.headers["retry-after"] and "call-control is unavailable" in r.json()["detail"]
    run = await svc.store.get_run(r.json()["run_id"])
    assert run.state == "failed" and run.end_reason is not None and run.end_reason.startswith("timeout: ")
    await asyncio.wait_for(ctl.hangup_seen.wait(), 5)
    assert (ctl.hangups[0].call_id, ctl.hangups[0].run_id) == (run.call_id, run.id)
    assert await svc.quota.in_use(org.id) == 0


async def test_no_call_control_at_all(client: httpx.AsyncClient, svc: ConfigService, dial_provider: str,
                                      helpers: Any) -> None:
    org, agent, _cfg = await setup_org(svc, helpers, dial_provider)
    r = await initiate(client, org, agent_uuid=agent, to="+14155550100")
    assert r.status_code == 503 and r.json()["code"] == "no_responders" and r.headers["retry-after"]
    run = await svc.store.get_run(r.json()["run_id"])
    assert run.state == "failed" and run.end_reason is not None and run.end_reason.startswith("no_responders: ")
    assert await svc.quota.in_use(org.id) == 0


async def test_quota_refusal(client: httpx.AsyncClient, svc: ConfigService, ctl: FakeCallControl,
                             dial_provider: str, helpers: Any) -> None:
    org, agent, _cfg = await setup_org(svc, helpers, dial_provider, limit=1)
    assert (await initiate(client, org, agent_uuid=agent, to="+14155550100")).status_code == 201
    r = await initiate(client, org, agent_uuid=agent, to="+14155550101")
    assert r.status_code == 429
    assert r.json()["detail"].startswith("Concurrent call limit reached: 1 of 1 calls in progress")
    assert int(r.headers["retry-after"]) >= 1
    assert len(ctl.requests) == 1 and len(await svc.store.list_runs(org.id, None, None, 10, 0)) == 1


# ------------------------------------------------------------------------------------------ ringing lease
async def test_lease_kept_while_ringing_then_left_to_ingress(start_service: Callable[..., Any], own_db: str,
                                                            dial_provider: str, helpers: Any) -> None:
    async with start_service(own_db, quota_lease_ttl_s=1.5) as svc:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://c") as client:
            fake = FakeCallControl()
            sub = await serve(svc.nc, svc.subjects.ctl(sj.CTL_INITIATE), InitiateRequest, fake.initiate)
            org, agent, _cfg = await setup_org(svc, helpers, dial_provider)
            r = await initiate(client, org, agent_uuid=agent, to="+14155550100")
            assert r.status_code == 201
            run = await svc.store.get_run(r.json()["run_id"])
            assert run.quota_lease_id is not None
            key, lease = svc.quota.key(org.id), run.quota_lease_id
            first = await svc.redis.zscore(key, lease)
            assert first is not None

            # Renewed past its first expiry while the run is 'created' (nobody else holds the call). The TTL
            # leaves a margin for a loaded machine: a renewal every 0.5 s for a 1.5 s lease.
            async def renewed_past_first_expiry() -> bool:
                score = await svc.redis.zscore(key, lease)
                return score is not None and score > first + 1500
            await helpers.eventually(renewed_past_first_expiry, timeout=10, what="lease renewed twice")
            assert await svc.quota.in_use(org.id) == 1

            # Answered: ingress holds the call now, config lets go (nobody renews here, so it lapses).
            await svc.store.update_run(RunUpdate(run_id=run.id, state="running"))

            async def keeper_gone() -> bool:
                return not svc.outbound.ringing.holding(run.id)
            await helpers.eventually(keeper_gone, timeout=10, what="keeper stopped on running")

            async def lapsed() -> bool:
                return await svc.quota.in_use(org.id) == 0
            await helpers.eventually(lapsed, timeout=10, what="lease lapsed")
            await sub.unsubscribe()


async def test_ringing_without_answer_is_left_to_the_reaper(start_service: Callable[..., Any], own_db: str,
                                                            dial_provider: str, helpers: Any) -> None:
    async with start_service(own_db, quota_lease_ttl_s=0.6) as svc:
        org, agent, _cfg = await setup_org(svc, helpers, dial_provider)
        lease = await svc.quota.acquire(org.id, 10)
        run = await svc.store.create_run(RunCreate(organization_id=org.id, agent_uuid=agent, name="WR-TEL-OUT-1",
                                                   call_type="outbound", mode=dial_provider, call_id="c-ring",
                                                   quota_lease_id=lease.lease_id))
        assert await asyncio.wait_for(svc.outbound.ringing.keep(org.id, run.id, lease.lease_id, 0.5), 5) == \
            "ring timeout"

        async def lapsed() -> bool:
            return await svc.quota.in_use(org.id) == 0
        await helpers.eventually(lapsed, timeout=5, what="lease lapsed after the ring timeout")
        assert svc.reaper is not None
        assert await svc.reaper.run_once() == []  # first sighting: a suspect
        assert await svc.reaper.run_once() == [run.id]
        ended = await svc.store.get_run(run.id)
        assert (ended.state, ended.end_reason) == ("failed", LEASE_EXPIRED_REASON)


async def test_no_answer_status_ends_a_ringing_call(start_service: Callable[..., Any], own_db: str,
                                                    dial_provider: str, helpers: Any) -> None:
    async with start_service(own_db, quota_lease_ttl_s=0.6) as svc:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://c") as client:
            fake = FakeCallControl()
            sub = await serve(svc.nc, svc.subjects.ctl(sj.CTL_INITIATE), InitiateRequest, fake.initiate)
            org, agent, _cfg = await setup_org(svc, helpers, dial_provider)
            r = await initiate(client, org, agent_uuid=agent, to="+14155550100")
            run = await svc.store.get_run(r.json()["run_id"])
            assert run.call_id is not None and svc.outbound.ringing.holding(run.id)
            await publish_event(svc.js, svc.subjects, sj.EVT_CALL_STATUS, CallStatusEvent(
                call_id=run.call_id, run_id=run.id, organization_id=org.id, source="ingress", status="no-answer",
                raw_status="no-answer", duration_s=0, fields={"CallStatus": "no-answer"}))

            async def ended() -> Any:
                rec = await svc.store.get_run(run.id)
                return rec if rec.state == "failed" else None
            rec = await helpers.eventually(ended, timeout=5, what="run failed on no-answer")
            assert rec.end_reason == "no-answer" and await svc.quota.in_use(org.id) == 0

            async def keeper_gone() -> bool:
                return not svc.outbound.ringing.holding(run.id)
            await helpers.eventually(keeper_gone, timeout=5, what="keeper stopped on the terminal run")
            await sub.unsubscribe()
