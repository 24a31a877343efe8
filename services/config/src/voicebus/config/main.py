"""``voicebus-config``: ``serve`` (migrates first), ``migrate``, ``create-org``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from voicebus.config.crypto import SecretKeyError
from voicebus.config.db import DatabaseUrlError, create_engine, sessionmaker
from voicebus.config.migrate import upgrade
from voicebus.config.service import ConfigService, secret_box
from voicebus.config.settings import ConfigSettings
from voicebus.config.store import Store
from voicebus.kit import run_service, serve_http
from voicebus.observability import setup_logging, setup_tracing

log = logging.getLogger("voicebus.config")


async def _serve(settings: ConfigSettings, stop: asyncio.Event) -> None:
    async with ConfigService(settings) as svc:
        log.info("admin API on http://%s:%d (OpenAPI at /docs)", settings.http_host, settings.port)
        await serve_http(svc.app, settings.http_host, settings.port, stop)
    log.info("config service stopped")


async def _migrate(settings: ConfigSettings) -> None:
    engine = create_engine(settings.database_url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


async def _create_org(settings: ConfigSettings, name: str, limit: int | None, as_json: bool) -> None:
    engine = create_engine(settings.database_url)
    try:
        await upgrade(engine)
        store = Store(sessionmaker(engine), secret_box(settings), settings.default_concurrent_calls)
        org, key = await store.create_organization(name, limit)
    finally:
        await engine.dispose()
    if as_json:
        print(json.dumps({"organization_id": org.id, "name": org.name,
                          "concurrent_call_limit": org.concurrent_call_limit, "api_key": key}))
    else:
        print(f"Created organization {org.id} ({org.name!r}), concurrent call limit {org.concurrent_call_limit}.")
        print(f"API key (shown only this once; store it now): {key}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voicebus-config", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="migrate, then serve the admin REST API and the NATS API")
    sub.add_parser("migrate", help="bring the database schema up to date and exit")
    c = sub.add_parser("create-org", help="create an organization and print its first API key")
    c.add_argument("--name", required=True)
    c.add_argument("--concurrent-calls", type=int, default=None,
                   help="concurrent call limit (default VOICEBUS_DEFAULT_CONCURRENT_CALLS)")
    c.add_argument("--json", action="store_true", help="print JSON: organization_id, name, api_key")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging("config")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # migrate.upgrade logs what changed
    try:
        settings = ConfigSettings()
        if args.command == "serve":
            setup_tracing("config")
            run_service(lambda stop: _serve(settings, stop))
        elif args.command == "migrate":
            asyncio.run(_migrate(settings))
        elif args.command == "create-org":
            if args.concurrent_calls is not None and args.concurrent_calls < 0:
                raise SystemExit("voicebus-config: --concurrent-calls must be >= 0")
            asyncio.run(_create_org(settings, args.name, args.concurrent_calls, args.json))
    except (SecretKeyError, DatabaseUrlError) as e:
        print(f"voicebus-config: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
