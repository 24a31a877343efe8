"""``voicebus-call-control``: the call-control service process."""

from __future__ import annotations

import asyncio
import logging

import httpx
from fastapi import FastAPI

from voicebus.bus.subjects import Subjects
from voicebus.call_control.carriers import Carriers
from voicebus.call_control.service import CallControlService
from voicebus.call_control.settings import CallControlSettings, load_settings
from voicebus.kit import Health, connect_nats, health_router, run_service, serve_http
from voicebus.observability import setup_logging, setup_tracing

log = logging.getLogger("voicebus.call_control")


def build_app(health: Health) -> FastAPI:
    app = FastAPI(title="voicebus call-control", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(health_router(health))
    return app


async def run(settings: CallControlSettings, stop: asyncio.Event) -> None:
    nc = await connect_nats(settings.nats_url, name="voicebus-call-control")
    http = httpx.AsyncClient(follow_redirects=False)
    service = CallControlService(nc, Subjects(settings.subject_prefix), Carriers(http, settings.carrier_api_urls),
                                 public_url=settings.public_url, instance_id=settings.instance_id,
                                 concurrency=settings.concurrency)
    overrides = ", ".join(f"{name}={url}" for name, url in sorted(settings.carrier_api_urls.items()))
    log.info("carrier API base URLs: %s", overrides or "every provider's default")
    try:
        await service.start()
        health = Health("call-control")
        health.add("nats", lambda: nc.is_connected)
        health.add("serving", lambda: service.started)
        health.info["instance"] = service.instance_id
        await serve_http(build_app(health), settings.http_host, settings.port, stop)
        log.info("stopping: finishing requests in flight")
    finally:
        await service.stop()
        await http.aclose()
        await nc.drain()
        log.info("stopped")


def main() -> None:
    setup_logging("call-control")
    setup_tracing("call-control")
    settings = load_settings()
    run_service(lambda stop: run(settings, stop))


if __name__ == "__main__":
    main()
