"""Service kit: settings from the environment and the health endpoints."""

from __future__ import annotations

import httpx
import pytest

from voicebus.kit import Health, ServiceSettings, health_router


def test_settings_read_conventional_env_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "nats://example:4222")
    monkeypatch.setenv("VOICEBUS_SUBJECT_PREFIX", "stage")
    s = ServiceSettings()
    assert (s.nats_url, s.subject_prefix) == ("nats://example:4222", "stage")


async def test_readyz_reports_each_check_and_fails_closed() -> None:
    from fastapi import FastAPI

    health = Health("svc")
    state = {"db": True}
    health.add("db", lambda: state["db"])

    async def nats_ok() -> bool:
        return True

    async def broken() -> bool:
        raise RuntimeError("down")

    health.add("nats", nats_ok)
    app = FastAPI()
    app.include_router(health_router(health))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/healthz")).json() == {"service": "svc", "status": "alive"}
        r = await client.get("/readyz")
        assert r.status_code == 200 and r.json()["checks"] == {"db": True, "nats": True}
        state["db"] = False
        r = await client.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["db"] is False
        health.add("redis", broken)
        state["db"] = True
        r = await client.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["redis"] is False
