"""Phone numbers through the admin API and inbound routing over NATS (``{prefix}.cfg.inbound.route``),
on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import nats
import pytest
from nats.aio.client import Client as NATS

from voicebus.bus import subjects as sj
from voicebus.bus.messages import InboundRoute, InboundRouteRequest
from voicebus.bus.rpc import BusError, request
from voicebus.config import ConfigService
from voicebus.config.phone import InvalidNumber, normalize_e164

TOKEN = "cx-token-abcdefgh5678"


@pytest.fixture(params=["sqlite", "postgres"])
def own_db(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    """A database of this test's own: numbers are unique across organizations, so tests sharing the
    session's PostgreSQL database would clash on them."""
    return sqlite_url if request.param == "sqlite" else request.getfixturevalue("pg_databases").create()


@pytest.fixture
async def svc(start_service: Callable[..., Any], own_db: str) -> AsyncIterator[ConfigService]:
    async with start_service(own_db) as s:
        yield s


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    c = await nats.connect(nats_url)
    yield c
    await c.close()


async def make_config(client: httpx.AsyncClient, org: Any, domain: str, name: str = "main") -> dict[str, Any]:
    r = await client.post("/api/v1/telephony-configurations", headers=org.headers, json={
        "provider": "cloudonix", "name": name, "credentials": {"domain_id": domain, "bearer_token": TOKEN}})
    assert r.status_code == 201, r.text
    return r.json()


async def make_agent(client: httpx.AsyncClient, org: Any, name: str = "desk") -> str:
    r = await client.post("/api/v1/agents", json={"name": name, "definition": {"greeting": name}}, headers=org.headers)
    assert r.status_code == 201, r.text
    return str(r.json()["uuid"])


# ------------------------------------------------------------------------------------------ E.164
@pytest.mark.parametrize(("given", "expected"), [
    ("+14155550100", "+14155550100"),
    ("+1 (415) 555-0100", "+14155550100"),
    ("+44 20 7946 0958", "+442079460958"),
    ("+1234567", "+1234567"),                 # 7 digits: the shortest E.164
    ("+123456789012345", "+123456789012345"),  # 15 digits: the longest
])
def test_e164_normalization(given: str, expected: str) -> None:
    assert normalize_e164(given) == expected


@pytest.mark.parametrize(("given", "why"), [
    ("14155550100", "must start with +"),
    ("+1.415.555.0100", "only digits may follow"),
    ("+1415555010a", "only digits may follow"),
    ("+٤١٥٥٥٥٠١٠٠٠", "only digits may follow"),  # non-ASCII digits are not digits here
    ("+04155550100", "cannot start with 0"),
    ("+123456", "6 digits"),
    ("+1234567890123456", "16 digits"),
    ("", "must start with +"),
])
def test_e164_errors_say_why(given: str, why: str) -> None:
    with pytest.raises(InvalidNumber) as e:
        normalize_e164(given)
    assert why in str(e.value) and "E.164" in str(e.value)


# ------------------------------------------------------------------------------------------ admin API
async def test_phone_number_crud(client: httpx.AsyncClient, org: Any, svc: ConfigService) -> None:
    cfg = await make_config(client, org, "Acme")
    cfg2 = await make_config(client, org, "beta", "second")
    agent = await make_agent(client, org)
    agent2 = await make_agent(client, org, "sales")

    r = await client.post("/api/v1/phone-numbers", headers=org.headers, json={
        "telephony_configuration_id": cfg["id"], "number": "+1 (415) 555-0100", "agent_uuid": agent.upper()})
    assert r.status_code == 201, r.text
    num = r.json()
    assert set(num) == {"id", "telephony_configuration_id", "provider", "account_id", "number", "agent_uuid",
                        "is_active", "created_at", "updated_at"}
    assert (num["number"], num["provider"], num["account_id"], num["agent_uuid"], num["is_active"]) == \
        ("+14155550100", "cloudonix", "acme.cloudonix.net", agent, True)
    r = await client.post("/api/v1/phone-numbers", headers=org.headers, json={
        "telephony_configuration_id": cfg2["id"], "number": "+14155550199", "agent_uuid": agent2,
        "is_active": False})
    assert r.status_code == 201 and r.json()["is_active"] is False
    other_num = r.json()

    assert [n["id"] for n in (await client.get("/api/v1/phone-numbers", headers=org.headers)).json()] == \
        [num["id"], other_num["id"]]
    listed = (await client.get(f"/api/v1/phone-numbers?telephony_configuration_id={cfg2['id']}",
                               headers=org.headers)).json()
    assert [n["id"] for n in listed] == [other_num["id"]]
    got = await client.get(f"/api/v1/phone-numbers/{num['id']}", headers=org.headers)
    assert got.status_code == 200 and got.json() == num

    r = await client.patch(f"/api/v1/phone-numbers/{num['id']}", headers=org.headers,
                           json={"agent_uuid": agent2, "is_active": False, "number": "+1-415-555-0101"})
    assert r.status_code == 200, r.text
    assert (r.json()["agent_uuid"], r.json()["is_active"], r.json()["number"]) == (agent2, False, "+14155550101")
    # Moving a number to another configuration moves it to that configuration's account.
    r = await client.patch(f"/api/v1/phone-numbers/{num['id']}", headers=org.headers,
                           json={"telephony_configuration_id": cfg2["id"]})
    assert r.status_code == 200 and r.json()["account_id"] == "beta.cloudonix.net"

    assert (await client.delete(f"/api/v1/phone-numbers/{num['id']}", headers=org.headers)).status_code == 204
    assert (await client.get(f"/api/v1/phone-numbers/{num['id']}", headers=org.headers)).status_code == 404
    assert (await client.delete(f"/api/v1/phone-numbers/{num['id']}", headers=org.headers)).status_code == 404


async def test_phone_number_errors_are_specific(client: httpx.AsyncClient, org: Any, svc: ConfigService,
                                                helpers: Any) -> None:
    cfg = await make_config(client, org, "acme")
    agent = await make_agent(client, org)
    base = {"telephony_configuration_id": cfg["id"], "agent_uuid": agent}

    r = await client.post("/api/v1/phone-numbers", headers=org.headers, json={**base, "number": "415 555 0100"})
    assert r.status_code == 422
    assert "'415 555 0100' is not an E.164 number" in r.json()["message"] and "start with +" in r.json()["message"]
    assert r.json()["detail"][0]["loc"] == ["body", "number"]
    r = await client.post("/api/v1/phone-numbers", headers=org.headers, json={**base, "number": "+0123456789"})
    assert r.status_code == 422 and "country code cannot start with 0" in r.json()["message"]
    r = await client.post("/api/v1/phone-numbers", headers=org.headers,
                          json={**base, "number": "+14155550100", "agnet": "typo"})
    assert r.status_code == 422 and "agnet" in r.json()["message"]

    other = await helpers.new_org(svc, "Other")
    other_cfg = await make_config(client, other, "acme")  # the same domain, in another organization
    other_agent = await make_agent(client, other)
    r = await client.post("/api/v1/phone-numbers", headers=org.headers,
                          json={**base, "telephony_configuration_id": other_cfg["id"], "number": "+14155550100"})
    assert r.status_code == 404 and f"telephony configuration {other_cfg['id']} not found" in r.json()["detail"]
    r = await client.post("/api/v1/phone-numbers", headers=org.headers,
                          json={**base, "agent_uuid": other_agent, "number": "+14155550100"})
    assert r.status_code == 404 and f"agent {other_agent} not found" in r.json()["detail"]

    first = (await client.post("/api/v1/phone-numbers", headers=org.headers,
                               json={**base, "number": "+14155550100"})).json()
    # The same number on the same account: 409 naming the number and the configuration.
    r = await client.post("/api/v1/phone-numbers", headers=org.headers, json={**base, "number": "+1 415 555 0100"})
    assert r.status_code == 409
    assert r.json()["detail"].startswith("number +14155550100 is already configured on cloudonix account "
                                         "'acme.cloudonix.net' (telephony configuration " + str(cfg["id"]))
    # Another organization on the same carrier account cannot take it either (one route per call), and is
    # not told which of our configurations has it.
    r = await client.post("/api/v1/phone-numbers", headers=other.headers, json={
        "telephony_configuration_id": other_cfg["id"], "agent_uuid": other_agent, "number": "+14155550100"})
    assert r.status_code == 409 and r.json()["detail"] == (
        "number +14155550100 is already configured on cloudonix account 'acme.cloudonix.net' (by another "
        "organization); a number routes to one agent")
    # ... but the same number on another account is another number.
    beta = await make_config(client, org, "beta", "b")
    r = await client.post("/api/v1/phone-numbers", headers=org.headers,
                          json={**base, "telephony_configuration_id": beta["id"], "number": "+14155550100"})
    assert r.status_code == 201
    r = await client.patch(f"/api/v1/phone-numbers/{r.json()['id']}", headers=org.headers,
                           json={"telephony_configuration_id": cfg["id"]})
    assert r.status_code == 409 and "+14155550100" in r.json()["detail"]

    # Another organization's number is 404 for every route.
    for method in ("GET", "PATCH", "DELETE"):
        r = await client.request(method, f"/api/v1/phone-numbers/{first['id']}", headers=other.headers,
                                 json={} if method == "PATCH" else None)
        assert r.status_code == 404 and f"phone number {first['id']} not found" in r.json()["detail"], method
    assert (await client.get("/api/v1/phone-numbers", headers=other.headers)).json() == []
    assert (await client.get("/api/v1/phone-numbers")).status_code == 401
    assert (await client.get(f"/api/v1/phone-numbers/{2**40}", headers=org.headers)).status_code == 404


async def test_configuration_with_numbers_cannot_be_deleted(client: httpx.AsyncClient, org: Any) -> None:
    cfg = await make_config(client, org, "acme")
    agent = await make_agent(client, org)
    num = (await client.post("/api/v1/phone-numbers", headers=org.headers, json={
        "telephony_configuration_id": cfg["id"], "number": "+14155550100", "agent_uuid": agent})).json()
    r = await client.delete(f"/api/v1/telephony-configurations/{cfg['id']}", headers=org.headers)
    assert r.status_code == 409
    assert r.json()["detail"] == (f"telephony configuration {cfg['id']} still has 1 phone number(s) (+14155550100); "
                                  "delete or move them first")
    assert (await client.delete(f"/api/v1/phone-numbers/{num['id']}", headers=org.headers)).status_code == 204
    assert (await client.delete(f"/api/v1/telephony-configurations/{cfg['id']}", headers=org.headers)).status_code \
        == 204


async def test_numbers_follow_their_configuration_to_a_new_account(client: httpx.AsyncClient, org: Any,
                                                                   svc: ConfigService, helpers: Any) -> None:
    cfg = await make_config(client, org, "acme")
    agent = await make_agent(client, org)
    num = (await client.post("/api/v1/phone-numbers", headers=org.headers, json={
        "telephony_configuration_id": cfg["id"], "number": "+14155550100", "agent_uuid": agent})).json()
    r = await client.put(f"/api/v1/telephony-configurations/{cfg['id']}", headers=org.headers,
                         json={"credentials": {"domain_id": "Renamed", "bearer_token": TOKEN}})
    assert r.status_code == 200 and r.json()["account_id"] == "renamed.cloudonix.net"
    moved = (await client.get(f"/api/v1/phone-numbers/{num['id']}", headers=org.headers)).json()
    assert moved["account_id"] == "renamed.cloudonix.net"

    # Moving onto an account where another organization already has that number is refused, and nothing moves.
    other = await helpers.new_org(svc, "Other")
    other_cfg = await make_config(client, other, "taken")
    await client.post("/api/v1/phone-numbers", headers=other.headers, json={
        "telephony_configuration_id": other_cfg["id"], "number": "+14155550100",
        "agent_uuid": await make_agent(client, other)})
    r = await client.put(f"/api/v1/telephony-configurations/{cfg['id']}", headers=org.headers,
                         json={"credentials": {"domain_id": "taken", "bearer_token": TOKEN}})
    assert r.status_code == 409
    assert "number +14155550100 of this configuration is already configured" in r.json()["detail"]
    assert (await client.get(f"/api/v1/telephony-configurations/{cfg['id']}", headers=org.headers)).json()[
        "account_id"] == "renamed.cloudonix.net"
    assert (await client.get(f"/api/v1/phone-numbers/{num['id']}", headers=org.headers)).json()["account_id"] == \
        "renamed.cloudonix.net"


async def test_openapi_lists_phone_numbers_and_initiate_call(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert set(spec["paths"]["/api/v1/phone-numbers"]) == {"get", "post"}
    assert set(spec["paths"]["/api/v1/phone-numbers/{number_id}"]) == {"get", "patch", "delete"}
    assert "409" in spec["paths"]["/api/v1/phone-numbers"]["post"]["responses"]
    initiate = spec["paths"]["/api/v1/telephony/initiate-call"]["post"]
    assert {"201", "400", "404", "429", "502", "503"} <= set(initiate["responses"])
    body = spec["components"]["schemas"]["InitiateCall"]["properties"]
    assert {"agent_uuid", "to", "from", "telephony_configuration_id"} <= set(body)


# ------------------------------------------------------------------------------------------ routing
async def test_inbound_route(client: httpx.AsyncClient, nc: NATS, org: Any, svc: ConfigService,
                             helpers: Any) -> None:
    subject = svc.subjects.cfg(sj.CFG_INBOUND_ROUTE)
    cfg = await make_config(client, org, "acme")
    agent = await make_agent(client, org)
    await client.post(f"/api/v1/agents/{agent}/publish", headers=org.headers)
    num = (await client.post("/api/v1/phone-numbers", headers=org.headers, json={
        "telephony_configuration_id": cfg["id"], "number": "+14155550100", "agent_uuid": agent})).json()
    # Another organization has the same Cloudonix domain, with another number: each number has one route.
    other = await helpers.new_org(svc, "Other")
    other_cfg = await make_config(client, other, "acme")
    other_agent = await make_agent(client, other, "theirs")
    other_num = (await client.post("/api/v1/phone-numbers", headers=other.headers, json={
        "telephony_configuration_id": other_cfg["id"], "number": "+14155550200", "agent_uuid": other_agent})).json()

    route = await request(nc, subject, InboundRouteRequest(provider="cloudonix", account_id=" ACME ",
                                                           called_number="+1 (415) 555-0100"), InboundRoute)
    assert (route.organization_id, route.telephony_config_id, route.phone_number_id, route.number) == \
        (org.id, cfg["id"], num["id"], "+14155550100")
    assert route.agent.agent_uuid == agent and route.agent.definition_source == "published"
    assert route.agent.version == 1 and route.agent.definition.greeting == "desk"
    route = await request(nc, subject, InboundRouteRequest(provider="cloudonix", account_id="acme.cloudonix.net",
                                                           called_number="+14155550200"), InboundRoute)
    assert (route.organization_id, route.telephony_config_id, route.phone_number_id) == \
        (other.id, other_cfg["id"], other_num["id"])
    assert route.agent.agent_uuid == other_agent and route.agent.definition_source == "draft"

    async def refused(req: InboundRouteRequest) -> BusError:
        with pytest.raises(BusError) as e:
            await request(nc, subject, req, InboundRoute)
        return e.value

    e = await refused(InboundRouteRequest(provider="cloudonix", account_id="nobody", called_number="+14155550100"))
    assert e.code == "unknown_account" and "'nobody.cloudonix.net'" in e.message
    e = await refused(InboundRouteRequest(provider="pigeon", account_id="acme", called_number="+14155550100"))
    assert e.code == "unknown_account" and "pigeon" in e.message
    e = await refused(InboundRouteRequest(provider="cloudonix", account_id="acme", called_number="+14155550999"))
    assert e.code == "unknown_number"
    assert e.message == "number +14155550999 is not configured on cloudonix account 'acme.cloudonix.net'"
    e = await refused(InboundRouteRequest(provider="cloudonix", account_id="acme", called_number="client:alice"))
    assert e.code == "unknown_number" and "not an E.164 number" in e.message

    await client.patch(f"/api/v1/phone-numbers/{num['id']}", headers=org.headers, json={"is_active": False})
    e = await refused(InboundRouteRequest(provider="cloudonix", account_id="acme", called_number="+14155550100"))
    assert e.code == "unknown_number" and "inactive" in e.message

    # The agent is gone (deleted under the number): not_found, naming it.
    await client.patch(f"/api/v1/phone-numbers/{num['id']}", headers=org.headers, json={"is_active": True})
    async with svc.engine.begin() as conn:
        import sqlalchemy as sa

        await conn.execute(sa.text("DELETE FROM agents WHERE uuid = :u"), {"u": agent})
    e = await refused(InboundRouteRequest(provider="cloudonix", account_id="acme", called_number="+14155550100"))
    assert e.code == "not_found" and agent in e.message and "no longer exists" in e.message
