"""The ``{prefix}.cfg.*`` request-reply API over real NATS, as ingress, runner and call-control call it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from voicebus.bus import subjects as sj
from voicebus.bus.agent import AgentDefinition, demo_definition
from voicebus.bus.messages import (
    AgentResolveRequest,
    QuotaAcquireRequest,
    QuotaLease,
    QuotaLeaseRef,
    QuotaReleased,
    ResolvedAgent,
    RunCreate,
    RunGetRequest,
    RunRecord,
    RunUpdate,
    TelephonyCredentials,
    TelephonyCredentialsRequest,
    TelephonyMatch,
    TelephonyMatchRequest,
)
from voicebus.bus.rpc import BusError, request
from voicebus.config import ConfigService

TOKEN = "cx-token-abcdefgh5678"


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    c = await nats.connect(nats_url)
    yield c
    await c.close()


@pytest.fixture
def cfg(svc: ConfigService) -> Any:
    return lambda action: svc.subjects.cfg(action)


async def make_agent(svc: ConfigService, org_id: int, publish: bool = False) -> str:
    agent = await svc.store.create_agent(org_id, "Front desk", demo_definition())
    if publish:
        await svc.store.publish_agent(org_id, agent.uuid)
    return agent.uuid


async def test_agent_resolve_draft_then_published(nc: NATS, cfg: Any, svc: ConfigService, org: Any) -> None:
    definition = AgentDefinition(greeting="v1", llm={"base_url": "http://127.0.0.1:9/v1", "model": "m",
                                                     "api_key": "sk-secret-value-9876"})
    agent = await svc.store.create_agent(org.id, "LLM", definition)
    got = await request(nc, cfg(sj.CFG_AGENT_RESOLVE), AgentResolveRequest(agent_uuid=agent.uuid), ResolvedAgent)
    assert got.definition_source == "draft" and got.version is None and got.organization_id == org.id
    assert got.definition.llm is not None and got.definition.llm.api_key == "sk-secret-value-9876"  # decrypted

    await svc.store.publish_agent(org.id, agent.uuid)
    await svc.store.update_agent(org.id, agent.uuid, None, definition.model_copy(update={"greeting": "v2 draft"}))
    got = await request(nc, cfg(sj.CFG_AGENT_RESOLVE), AgentResolveRequest(agent_uuid=agent.uuid.upper()),
                        ResolvedAgent)
    assert got.definition_source == "published" and got.version == 1 and got.definition.greeting == "v1"

    with pytest.raises(BusError) as e:
        await request(nc, cfg(sj.CFG_AGENT_RESOLVE),
                      AgentResolveRequest(agent_uuid="00000000-0000-4000-8000-000000000000"), ResolvedAgent)
    assert e.value.code == "not_found"


async def test_telephony_match_and_credentials(nc: NATS, cfg: Any, svc: ConfigService, org: Any,
                                               helpers: Any) -> None:
    main = await svc.store.create_telephony(org.id, "cloudonix", "main", {"domain_id": "acme.cloudonix.net",
                                                                          "bearer_token": TOKEN})
    empty = await svc.store.create_telephony(org.id, "cloudonix", "no token", {"domain_id": "beta"})

    m = await request(nc, cfg(sj.CFG_TELEPHONY_MATCH),
                      TelephonyMatchRequest(organization_id=org.id, provider="cloudonix", account_id=" ACME "),
                      TelephonyMatch)
    assert m.telephony_config_id == main.id and m.account_id == "acme.cloudonix.net" and m.has_credentials
    m = await request(nc, cfg(sj.CFG_TELEPHONY_MATCH),
                      TelephonyMatchRequest(organization_id=org.id, provider="cloudonix",
                                            account_id="beta.cloudonix.net"), TelephonyMatch)
    assert m.telephony_config_id == empty.id and m.has_credentials is False

    other = await helpers.new_org(svc, "Other")
    for req in (TelephonyMatchRequest(organization_id=other.id, provider="cloudonix", account_id="acme"),
                TelephonyMatchRequest(organization_id=org.id, provider="cloudonix", account_id="gamma"),
                TelephonyMatchRequest(organization_id=org.id, provider="nope", account_id="acme")):
        with pytest.raises(BusError) as e:
            await request(nc, cfg(sj.CFG_TELEPHONY_MATCH), req, TelephonyMatch)
        assert e.value.code == "not_found"

    creds = await request(nc, cfg(sj.CFG_TELEPHONY_CREDENTIALS),
                          TelephonyCredentialsRequest(telephony_config_id=main.id), TelephonyCredentials)
    assert creds.credentials == {"domain_id": "acme.cloudonix.net", "bearer_token": TOKEN}
    assert creds.organization_id == org.id and creds.provider == "cloudonix"
    with pytest.raises(BusError) as e:
        await request(nc, cfg(sj.CFG_TELEPHONY_CREDENTIALS),
                      TelephonyCredentialsRequest(telephony_config_id=999_999), TelephonyCredentials)
    assert e.value.code == "not_found"


async def test_run_create_update_get(nc: NATS, cfg: Any, svc: ConfigService, org: Any) -> None:
    agent_uuid = await make_agent(svc, org.id)
    tcfg = await svc.store.create_telephony(org.id, "cloudonix", "m", {"domain_id": "acme", "bearer_token": TOKEN})
    lease = await request(nc, cfg(sj.CFG_QUOTA_ACQUIRE), QuotaAcquireRequest(organization_id=org.id, holder="c1"),
                          QuotaLease)
    run = await request(nc, cfg(sj.CFG_RUN_CREATE), RunCreate(
        organization_id=org.id, agent_uuid=agent_uuid, name="WR-AGS-0000ABCD", call_type="inbound",
        mode="cloudonix", definition_source="draft", initial_context={"caller_number": "+1555"},
        gathered_context={"call_id": "c1"}, logs={"inbound_webhook": {"Domain": "acme"}},
        quota_lease_id=lease.lease_id), RunRecord)
    assert run.state == "created" and run.started_at is None and run.definition_source == "draft"

    upd = await request(nc, cfg(sj.CFG_RUN_UPDATE), RunUpdate(
        run_id=run.id, state="running", telephony_configuration_id=tcfg.id,
        gathered_context={"stream_sid": "MZ1"}, logs={"runner": {"id": "r1"}}), RunRecord)
    assert upd.state == "running" and upd.started_at is not None and upd.telephony_configuration_id == tcfg.id
    assert upd.gathered_context == {"call_id": "c1", "stream_sid": "MZ1"}
    assert upd.logs == {"inbound_webhook": {"Domain": "acme"}, "runner": {"id": "r1"}}
    assert await svc.quota.in_use(org.id) == 1

    done = await request(nc, cfg(sj.CFG_RUN_UPDATE),
                         RunUpdate(run_id=run.id, state="completed", end_reason="caller_hangup"), RunRecord)
    assert done.state == "completed" and done.end_reason == "caller_hangup" and done.ended_at is not None
    assert await svc.quota.in_use(org.id) == 0  # ending the run released its slot

    # A terminal run never changes state again; late data still merges so nothing is lost.
    late = await request(nc, cfg(sj.CFG_RUN_UPDATE), RunUpdate(
        run_id=run.id, state="failed", end_reason="too late", gathered_context={"summary": "ok"}), RunRecord)
    assert (late.state, late.end_reason, late.ended_at) == ("completed", "caller_hangup", done.ended_at)
    assert late.gathered_context["summary"] == "ok"
    again = await request(nc, cfg(sj.CFG_RUN_UPDATE), RunUpdate(run_id=run.id, state="running"), RunRecord)
    assert again.state == "completed"

    got = await request(nc, cfg(sj.CFG_RUN_GET), RunGetRequest(run_id=run.id), RunRecord)
    assert got.model_dump() == again.model_dump()
    for subject, payload in [(sj.CFG_RUN_GET, RunGetRequest(run_id=999_999)),
                             (sj.CFG_RUN_UPDATE, RunUpdate(run_id=999_999, state="running"))]:
        with pytest.raises(BusError) as e:
            await request(nc, cfg(subject), payload, RunRecord)
        assert e.value.code == "not_found"


async def test_run_create_and_update_refuse_bad_references(nc: NATS, cfg: Any, svc: ConfigService, org: Any,
                                                           helpers: Any) -> None:
    agent_uuid = await make_agent(svc, org.id)
    other = await helpers.new_org(svc, "Other")
    other_cfg = await svc.store.create_telephony(other.id, "cloudonix", "m", {"domain_id": "x"})
    base = dict(agent_uuid=agent_uuid, name="WR", call_type="inbound", mode="cloudonix")
    with pytest.raises(BusError) as e:
        await request(nc, cfg(sj.CFG_RUN_CREATE), RunCreate(organization_id=other.id, **base), RunRecord)
    assert e.value.code == "not_found" and agent_uuid in e.value.message
    run = await request(nc, cfg(sj.CFG_RUN_CREATE), RunCreate(organization_id=org.id, **base), RunRecord)
    with pytest.raises(BusError) as e:
        await request(nc, cfg(sj.CFG_RUN_UPDATE),
                      RunUpdate(run_id=run.id, telephony_configuration_id=other_cfg.id), RunRecord)
    assert e.value.code == "invalid_request"
    with pytest.raises(BusError) as e:
        await request(nc, cfg(sj.CFG_RUN_CREATE), RunCreate(organization_id=org.id, **{**base, "name": "W" * 300}),
                      RunRecord)
    assert e.value.code == "invalid_request" and "name is longer than 200" in e.value.message
    with pytest.raises(BusError) as e:
        await request(nc, cfg(sj.CFG_RUN_GET), RunGetRequest(run_id=2**40), RunRecord)
    assert e.value.code == "not_found"
    # Malformed requests get a specific error, not a timeout.
    reply = await nc.request(cfg(sj.CFG_RUN_CREATE), b'{"organization_id": "x"}', timeout=3)
    body = json.loads(reply.data)
    assert body["ok"] is False and body["error"]["code"] == "invalid_request"
    assert "organization_id" in body["error"]["message"]


async def test_quota_over_nats(nc: NATS, cfg: Any, svc: ConfigService, helpers: Any) -> None:
    org = await helpers.new_org(svc, "Small", limit=1)
    lease = await request(nc, cfg(sj.CFG_QUOTA_ACQUIRE), QuotaAcquireRequest(organization_id=org.id, holder="c1"),
                          QuotaLease)
    assert lease.limit == 1 and lease.in_use == 1 and lease.ttl_s == svc.settings.quota_lease_ttl_s
    with pytest.raises(BusError) as e:
        await request(nc, cfg(sj.CFG_QUOTA_ACQUIRE), QuotaAcquireRequest(organization_id=org.id, holder="c2"),
                      QuotaLease)
    assert (e.value.code, e.value.message) == ("quota_exceeded", "Concurrent call limit reached")

    ref = QuotaLeaseRef(organization_id=org.id, lease_id=lease.lease_id)
    renewed = await request(nc, cfg(sj.CFG_QUOTA_RENEW), ref, QuotaLease)
    assert renewed.lease_id == lease.lease_id
    assert (await request(nc, cfg(sj.CFG_QUOTA_RELEASE), ref, QuotaReleased)).released is True
    assert (await request(nc, cfg(sj.CFG_QUOTA_RELEASE), ref, QuotaReleased)).released is False
    with pytest.raises(BusError) as e:
        await request(nc, cfg(sj.CFG_QUOTA_RENEW), ref, QuotaLease)
    assert e.value.code == "lease_expired"
    with pytest.raises(BusError) as e:
        await request(nc, cfg(sj.CFG_QUOTA_ACQUIRE), QuotaAcquireRequest(organization_id=999_999, holder="c"),
                      QuotaLease)
    assert e.value.code == "not_found"
