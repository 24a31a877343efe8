"""Admin REST API against the real app on a real database (each test runs on SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from voicebus.bus.agent import demo_definition
from voicebus.bus.messages import RunCreate, RunRecord, RunUpdate
from voicebus.config import ConfigService
from voicebus.telephony import all_specs

TOKEN = "cx-token-abcdefgh5678"
LLM_KEY = "sk-test-0123456789wxyz"


@pytest.fixture
async def svc(start_service: Callable[..., Any], db_url: str) -> AsyncIterator[ConfigService]:
    async with start_service(db_url) as s:
        yield s


def llm_definition(api_key: str | None = LLM_KEY) -> dict[str, Any]:
    return {"greeting": "Hi", "llm": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key": api_key}}


async def raw_row(svc: ConfigService, table: str, where: str, **params: Any) -> str:
    """The row as the database stores it, as one string (to prove a plaintext is not in it)."""
    async with svc.engine.connect() as conn:
        row = (await conn.execute(sa.text(f"SELECT * FROM {table} WHERE {where}"), params)).mappings().one()
    return json.dumps({k: v for k, v in row.items()}, default=str)


# ------------------------------------------------------------------------------------------ auth
async def test_auth_errors_are_specific(client: httpx.AsyncClient, svc: ConfigService, org: Any) -> None:
    r = await client.get("/api/v1/organizations/me")
    assert r.status_code == 401 and "missing Authorization header" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"
    r = await client.get("/api/v1/organizations/me", headers={"Authorization": f"Basic {org.key}"})
    assert r.status_code == 401 and "malformed Authorization header" in r.json()["detail"]
    r = await client.get("/api/v1/organizations/me", headers={"Authorization": "Bearer "})
    assert r.status_code == 401 and "malformed" in r.json()["detail"]
    r = await client.get("/api/v1/organizations/me", headers={"Authorization": "Bearer abc"})
    assert r.status_code == 401 and "malformed API key" in r.json()["detail"]
    r = await client.get("/api/v1/organizations/me", headers={"Authorization": "Bearer vbk_" + "x" * 43})
    assert r.status_code == 401 and r.json()["detail"] == "unknown API key"
    r = await client.get("/api/v1/organizations/me", headers=org.headers)
    assert r.status_code == 200 and r.json()["id"] == org.id


async def test_api_keys_shown_once_revocable(client: httpx.AsyncClient, org: Any, svc: ConfigService,
                                             helpers: Any) -> None:
    r = await client.post("/api/v1/api-keys", json={"name": "ci"}, headers=org.headers)
    assert r.status_code == 201
    created = r.json()
    key = created["key"]
    assert key.startswith("vbk_") and created["prefix"] == key[:12]
    listed = (await client.get("/api/v1/api-keys", headers=org.headers)).json()
    assert len(listed) == 2 and all("key" not in k for k in listed)
    assert key not in json.dumps(listed)
    assert key not in await raw_row(svc, "api_keys", "id = :id", id=created["id"])

    new_headers = {"Authorization": f"Bearer {key}"}
    me = await client.get("/api/v1/organizations/me", headers=new_headers)
    assert me.status_code == 200
    listed = (await client.get("/api/v1/api-keys", headers=org.headers)).json()
    assert next(k for k in listed if k["id"] == created["id"])["last_used_at"] is not None

    r = await client.delete(f"/api/v1/api-keys/{created['id']}", headers=org.headers)
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    r = await client.get("/api/v1/organizations/me", headers=new_headers)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    # Revoking again is idempotent; the last active key cannot be revoked (it would lock the org out).
    assert (await client.delete(f"/api/v1/api-keys/{created['id']}", headers=org.headers)).status_code == 200
    own = next(k for k in listed if k["id"] != created["id"])
    r = await client.delete(f"/api/v1/api-keys/{own['id']}", headers=org.headers)
    assert r.status_code == 409 and "last active API key" in r.json()["detail"]

    other = await helpers.new_org(svc, "Other")
    r = await client.delete(f"/api/v1/api-keys/{own['id']}", headers=other.headers)
    assert r.status_code == 404
    r = await client.post("/api/v1/api-keys", json={"name": ""}, headers=org.headers)
    assert r.status_code == 422 and "name" in r.json()["message"]


# ------------------------------------------------------------------------------------------ organization
async def test_organization_get_and_patch(client: httpx.AsyncClient, org: Any) -> None:
    me = (await client.get("/api/v1/organizations/me", headers=org.headers)).json()
    assert me["name"] == "Acme" and me["concurrent_call_limit"] == 10
    r = await client.patch("/api/v1/organizations/me", json={"name": "Acme 2", "concurrent_call_limit": 3},
                           headers=org.headers)
    assert r.status_code == 200 and r.json()["name"] == "Acme 2" and r.json()["concurrent_call_limit"] == 3
    r = await client.patch("/api/v1/organizations/me", json={"concurrent_call_limit": -1}, headers=org.headers)
    assert r.status_code == 422 and "concurrent_call_limit" in r.json()["message"]
    r = await client.patch("/api/v1/organizations/me", json={"concurent_call_limit": 5}, headers=org.headers)
    assert r.status_code == 422 and "concurent_call_limit" in r.json()["message"]
    me = (await client.get("/api/v1/organizations/me", headers=org.headers)).json()
    assert me["concurrent_call_limit"] == 3  # refused patches changed nothing


# ------------------------------------------------------------------------------------------ agents
async def test_agent_draft_publish_versions(client: httpx.AsyncClient, org: Any, svc: ConfigService,
                                            helpers: Any) -> None:
    definition = demo_definition().model_dump(mode="json")
    r = await client.post("/api/v1/agents", json={"name": "Front desk", "definition": definition},
                          headers=org.headers)
    assert r.status_code == 201
    agent = r.json()
    assert set(agent) == {"uuid", "name", "draft_definition", "published_version", "published_definition",
                          "created_at", "updated_at"}
    uuid = agent["uuid"]
    assert agent["published_version"] is None and agent["published_definition"] is None
    assert agent["draft_definition"]["greeting"] == definition["greeting"]

    r = await client.post(f"/api/v1/agents/{uuid}/publish", headers=org.headers)
    assert r.status_code == 200 and r.json()["published_version"] == 1 and r.json()["uuid"] == uuid

    edited = {**definition, "greeting": "Welcome back"}
    r = await client.put(f"/api/v1/agents/{uuid}", json={"definition": edited}, headers=org.headers)
    assert r.status_code == 200
    body = r.json()
    assert body["draft_definition"]["greeting"] == "Welcome back"
    assert body["published_definition"]["greeting"] == definition["greeting"]  # draft edits only
    resolved = await svc.store.resolve_agent(uuid)
    assert resolved.version == 1 and resolved.definition.greeting == definition["greeting"]

    r = await client.post(f"/api/v1/agents/{uuid}/publish", headers=org.headers)
    assert r.json()["published_version"] == 2 and r.json()["published_definition"]["greeting"] == "Welcome back"
    versions = (await client.get(f"/api/v1/agents/{uuid}/versions", headers=org.headers)).json()
    assert [v["version"] for v in versions] == [1, 2]
    assert versions[0]["definition"]["greeting"] == definition["greeting"]

    r = await client.put(f"/api/v1/agents/{uuid}", json={"name": "Renamed"}, headers=org.headers)
    assert r.json()["name"] == "Renamed" and r.json()["uuid"] == uuid
    listed = (await client.get("/api/v1/agents", headers=org.headers)).json()
    assert [a["uuid"] for a in listed] == [uuid]

    other = await helpers.new_org(svc, "Other")
    for method, path in [("GET", f"/api/v1/agents/{uuid}"), ("PUT", f"/api/v1/agents/{uuid}"),
                         ("POST", f"/api/v1/agents/{uuid}/publish"), ("GET", f"/api/v1/agents/{uuid}/versions")]:
        r = await client.request(method, path, headers=other.headers, json={} if method == "PUT" else None)
        assert r.status_code == 404, (method, path)
        assert "not found" in r.json()["detail"]
    assert (await client.get("/api/v1/agents", headers=other.headers)).json() == []


async def test_agent_definition_errors_are_specific(client: httpx.AsyncClient, org: Any) -> None:
    bad_flow = {"flow": {"start": "nowhere", "nodes": {"a": {"say": "x"}}}}
    r = await client.post("/api/v1/agents", json={"name": "x", "definition": bad_flow}, headers=org.headers)
    assert r.status_code == 422 and "flow.start 'nowhere' is not a node" in r.json()["message"]
    both = {"flow": {"start": "a", "nodes": {"a": {}}}, "llm": {"base_url": "http://x/v1", "model": "m"}}
    r = await client.post("/api/v1/agents", json={"name": "x", "definition": both}, headers=org.headers)
    assert r.status_code == 422 and "either a scripted flow or an llm" in r.json()["message"]
    r = await client.post("/api/v1/agents", json={"name": "x", "definition": {"greting": "typo"}},
                          headers=org.headers)
    assert r.status_code == 422 and "greting" in r.json()["message"]
    r = await client.post("/api/v1/agents", json={"definition": {}}, headers=org.headers)
    assert r.status_code == 422 and "name" in r.json()["message"]
    assert (await client.get("/api/v1/agents", headers=org.headers)).json() == []


async def test_agent_llm_key_encrypted_masked_and_kept(client: httpx.AsyncClient, org: Any,
                                                       svc: ConfigService) -> None:
    r = await client.post("/api/v1/agents", json={"name": "LLM", "definition": llm_definition()},
                          headers=org.headers)
    assert r.status_code == 201
    agent = r.json()
    assert agent["draft_definition"]["llm"]["api_key"] == "****wxyz"
    assert LLM_KEY not in r.text
    assert LLM_KEY not in await raw_row(svc, "agents", "uuid = :u", u=agent["uuid"])

    # Echoing the masked form keeps the secret; the runner still gets the real key.
    echoed = agent["draft_definition"]
    echoed["llm"]["model"] = "m2"
    r = await client.put(f"/api/v1/agents/{agent['uuid']}", json={"definition": echoed}, headers=org.headers)
    assert r.status_code == 200 and r.json()["draft_definition"]["llm"]["model"] == "m2"
    resolved = await svc.store.resolve_agent(agent["uuid"])
    assert resolved.definition_source == "draft" and resolved.definition.llm is not None
    assert resolved.definition.llm.api_key == LLM_KEY

    # A mask that does not match is refused instead of overwriting the key with asterisks.
    echoed["llm"]["api_key"] = "****0000"
    r = await client.put(f"/api/v1/agents/{agent['uuid']}", json={"definition": echoed}, headers=org.headers)
    assert r.status_code == 422 and "llm.api_key" in r.json()["message"]
    r = await client.post("/api/v1/agents", json={"name": "x", "definition": llm_definition("****wxyz")},
                          headers=org.headers)
    assert r.status_code == 422

    r = await client.post(f"/api/v1/agents/{agent['uuid']}/publish", headers=org.headers)
    assert r.json()["published_definition"]["llm"]["api_key"] == "****wxyz"
    version_row = await raw_row(svc, "agent_versions", "version = 1 AND agent_id = "
                                "(SELECT id FROM agents WHERE uuid = :u)", u=agent["uuid"])
    assert LLM_KEY not in version_row
    versions = await client.get(f"/api/v1/agents/{agent['uuid']}/versions", headers=org.headers)
    assert LLM_KEY not in versions.text and "****wxyz" in versions.text
    resolved = await svc.store.resolve_agent(agent["uuid"])
    assert resolved.definition_source == "published" and resolved.definition.llm.api_key == LLM_KEY  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------ telephony
async def test_telephony_crud_masking_and_conflicts(client: httpx.AsyncClient, org: Any,
                                                    svc: ConfigService, helpers: Any) -> None:
    body = {"provider": "cloudonix", "name": "main", "credentials": {"domain_id": "Acme", "bearer_token": TOKEN}}
    r = await client.post("/api/v1/telephony-configurations", json=body, headers=org.headers)
    assert r.status_code == 201, r.text
    cfg = r.json()
    assert cfg["account_id"] == "acme.cloudonix.net"
    assert cfg["credentials"] == {"domain_id": "acme.cloudonix.net", "bearer_token": "****5678"}
    assert TOKEN not in r.text
    assert TOKEN not in await raw_row(svc, "telephony_configurations", "id = :id", id=cfg["id"])

    # Same domain, spelled differently, in the same org: 409. Another org may use it.
    dup = {**body, "name": "again", "credentials": {"domain_id": "ACME.cloudonix.net.", "bearer_token": "x"}}
    r = await client.post("/api/v1/telephony-configurations", json=dup, headers=org.headers)
    assert r.status_code == 409 and "acme.cloudonix.net" in r.json()["detail"]
    other = await helpers.new_org(svc, "Other")
    assert (await client.post("/api/v1/telephony-configurations", json=dup, headers=other.headers)).status_code == 201

    # Masked value echoed back keeps the token; a new value replaces it.
    r = await client.put(f"/api/v1/telephony-configurations/{cfg['id']}",
                         json={"name": "renamed", "credentials": cfg["credentials"]}, headers=org.headers)
    assert r.status_code == 200 and r.json()["name"] == "renamed"
    creds = await svc.store.telephony_credentials(cfg["id"])
    assert creds.credentials["bearer_token"] == TOKEN
    r = await client.put(f"/api/v1/telephony-configurations/{cfg['id']}",
                         json={"credentials": {"domain_id": "acme", "bearer_token": "****9999"}},
                         headers=org.headers)
    assert r.status_code == 422 and "bearer_token" in r.json()["message"]
    r = await client.put(f"/api/v1/telephony-configurations/{cfg['id']}",
                         json={"credentials": {"domain_id": "acme", "bearer_token": "brand-new-token-4321"}},
                         headers=org.headers)
    assert r.json()["credentials"]["bearer_token"] == "****4321"
    assert (await svc.store.telephony_credentials(cfg["id"])).credentials["bearer_token"] == "brand-new-token-4321"

    listed = (await client.get("/api/v1/telephony-configurations?provider=cloudonix", headers=org.headers)).json()
    assert [c["id"] for c in listed] == [cfg["id"]]
    assert (await client.get("/api/v1/telephony-configurations?provider=twilio", headers=org.headers)).json() == []
    r = await client.get("/api/v1/telephony-configurations?provider=nope", headers=org.headers)
    assert r.status_code == 422 and "cloudonix" in r.json()["message"]

    assert (await client.get(f"/api/v1/telephony-configurations/{cfg['id']}", headers=other.headers)).status_code \
        == 404
    assert (await client.delete(f"/api/v1/telephony-configurations/{cfg['id']}", headers=other.headers)).status_code \
        == 404
    r = await client.delete(f"/api/v1/telephony-configurations/{cfg['id']}", headers=org.headers)
    assert r.status_code == 204
    assert (await client.get(f"/api/v1/telephony-configurations/{cfg['id']}", headers=org.headers)).status_code \
        == 404


async def test_telephony_input_errors(client: httpx.AsyncClient, org: Any) -> None:
    r = await client.post("/api/v1/telephony-configurations",
                          json={"provider": "carrier-pigeon", "name": "x", "credentials": {}}, headers=org.headers)
    assert r.status_code == 422
    msg = r.json()["message"]
    assert "carrier-pigeon" in msg and all(s.name in msg for s in all_specs())
    r = await client.post("/api/v1/telephony-configurations",
                          json={"provider": "twilio", "name": "x", "credentials": {"account_sid": "AC" + "0" * 32}},
                          headers=org.headers)
    assert r.status_code == 422 and "auth_token" in r.json()["message"]
    assert r.json()["detail"][0]["loc"] == ["body", "credentials", "auth_token"]
    r = await client.post("/api/v1/telephony-configurations",
                          json={"provider": "cloudonix", "name": "x", "credentials": {"domain_id": "a b"}},
                          headers=org.headers)
    assert r.status_code == 422 and "domain_id" in r.json()["message"]
    r = await client.post("/api/v1/telephony-configurations",
                          json={"provider": "cloudonix", "name": "", "credentials": {"domain_id": "a"}},
                          headers=org.headers)
    assert r.status_code == 422 and "name" in r.json()["message"]
    assert (await client.get("/api/v1/telephony-configurations", headers=org.headers)).json() == []


async def test_delete_telephony_in_use_by_live_run(client: httpx.AsyncClient, org: Any, svc: ConfigService) -> None:
    agent = (await client.post("/api/v1/agents", json={"name": "a", "definition": {}}, headers=org.headers)).json()
    cfg = (await client.post("/api/v1/telephony-configurations", headers=org.headers, json={
        "provider": "cloudonix", "name": "m", "credentials": {"domain_id": "d1", "bearer_token": TOKEN}})).json()
    run = await svc.store.create_run(RunCreate(organization_id=org.id, agent_uuid=agent["uuid"], name="WR-1",
                                               call_type="inbound", mode="cloudonix"))
    await svc.store.update_run(RunUpdate(run_id=run.id, state="running", telephony_configuration_id=cfg["id"]))
    r = await client.delete(f"/api/v1/telephony-configurations/{cfg['id']}", headers=org.headers)
    assert r.status_code == 409 and "active run" in r.json()["detail"]
    await svc.store.update_run(RunUpdate(run_id=run.id, state="completed", end_reason="done"))
    assert (await client.delete(f"/api/v1/telephony-configurations/{cfg['id']}", headers=org.headers)).status_code \
        == 204
    kept = (await client.get(f"/api/v1/runs/{run.id}", headers=org.headers)).json()
    assert kept["state"] == "completed" and kept["telephony_configuration_id"] is None


async def test_provider_metadata(client: httpx.AsyncClient, org: Any) -> None:
    r = await client.get("/api/v1/telephony-providers/metadata", headers=org.headers)
    assert r.status_code == 200
    meta = {m["name"]: m for m in r.json()}
    assert set(meta) == {s.name for s in all_specs()}
    fields = {f["name"]: f for f in meta["cloudonix"]["fields"]}
    assert fields["bearer_token"]["sensitive"] is True and meta["cloudonix"]["supports_agent_stream"] is True
    assert (await client.get("/api/v1/telephony-providers/metadata")).status_code == 401


# ------------------------------------------------------------------------------------------ runs, quota, health
async def test_runs_listing_filters_and_shape(client: httpx.AsyncClient, org: Any, svc: ConfigService,
                                              helpers: Any) -> None:
    a1 = (await client.post("/api/v1/agents", json={"name": "a1", "definition": {}}, headers=org.headers)).json()
    a2 = (await client.post("/api/v1/agents", json={"name": "a2", "definition": {}}, headers=org.headers)).json()
    ids = []
    for i, agent in enumerate([a1, a1, a2]):
        run = await svc.store.create_run(RunCreate(
            organization_id=org.id, agent_uuid=agent["uuid"], name=f"WR-AGS-{i:08d}", call_type="inbound",
            mode="cloudonix", initial_context={"caller_number": "+1555"}, gathered_context={"call_id": f"c{i}"}))
        ids.append(run.id)
    await svc.store.update_run(RunUpdate(run_id=ids[0], state="running"))

    runs = (await client.get("/api/v1/runs", headers=org.headers)).json()
    assert [r["id"] for r in runs] == ids[::-1]
    assert set(runs[0]) == set(RunRecord.model_fields)
    assert RunRecord.model_validate(runs[-1]).initial_context == {"caller_number": "+1555"}
    by_agent = (await client.get(f"/api/v1/runs?agent_uuid={a1['uuid']}", headers=org.headers)).json()
    assert sorted(r["id"] for r in by_agent) == ids[:2]
    running = (await client.get("/api/v1/runs?state=running", headers=org.headers)).json()
    assert [r["id"] for r in running] == [ids[0]] and running[0]["started_at"] is not None
    page = (await client.get("/api/v1/runs?limit=1&offset=1", headers=org.headers)).json()
    assert [r["id"] for r in page] == [ids[1]]
    assert (await client.get("/api/v1/runs?limit=0", headers=org.headers)).status_code == 422
    assert (await client.get("/api/v1/runs?limit=501", headers=org.headers)).status_code == 422
    r = await client.get("/api/v1/runs?state=bogus", headers=org.headers)
    assert r.status_code == 422 and "state" in r.json()["message"]

    one = await client.get(f"/api/v1/runs/{ids[2]}", headers=org.headers)
    assert one.status_code == 200 and one.json()["agent_uuid"] == a2["uuid"]
    other = await helpers.new_org(svc, "Other")
    assert (await client.get(f"/api/v1/runs/{ids[2]}", headers=other.headers)).status_code == 404
    assert (await client.get("/api/v1/runs", headers=other.headers)).json() == []


async def test_quota_endpoint_counts_live_leases(client: httpx.AsyncClient, org: Any, svc: ConfigService) -> None:
    assert (await client.get("/api/v1/quota", headers=org.headers)).json() == {"concurrent_call_limit": 10,
                                                                             "in_use": 0}
    lease = await svc.quota.acquire(org.id, 10)
    await svc.quota.acquire(org.id, 10)
    assert (await client.get("/api/v1/quota", headers=org.headers)).json()["in_use"] == 2
    await svc.quota.release(org.id, lease.lease_id)
    assert (await client.get("/api/v1/quota", headers=org.headers)).json()["in_use"] == 1


async def test_health_and_openapi(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json()["status"] == "alive"
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": True, "redis": True, "nats": True}
    spec = (await client.get("/openapi.json")).json()
    for path in ["/api/v1/agents/{agent_uuid}/publish", "/api/v1/telephony-configurations/{config_id}",
                 "/api/v1/runs", "/api/v1/quota", "/api/v1/organizations/me", "/api/v1/api-keys/{key_id}"]:
        assert path in spec["paths"], path
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert (await client.get("/docs")).status_code == 200


async def test_readyz_reports_a_dead_dependency(start_service: Callable[..., Any], sqlite_url: str) -> None:
    async with start_service(sqlite_url, redis_url="redis://127.0.0.1:1/0", consumer=False) as svc:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://c") as c:
            r = await c.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"] == {"database": True, "redis": False, "nats": True}
