"""Alembic environment. voicebus runs migrations programmatically (``voicebus-config migrate`` and on
``serve``), handing the connection in ``config.attributes["connection"]``; the plain ``alembic`` CLI
also works and then connects to ``DATABASE_URL``."""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection

from voicebus.config.models import Base
from voicebus.config.settings import DEFAULT_DATABASE_URL


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things in place
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_from_env() -> None:
    from voicebus.config.db import create_engine

    async def main() -> None:
        engine = create_engine(os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL))
        try:
            async with engine.begin() as conn:
                await conn.run_sync(_run)
        finally:
            await engine.dispose()

    asyncio.run(main())


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run `voicebus-config migrate`")

_conn = context.config.attributes.get("connection")
if _conn is not None:
    _run(_conn)
else:
    _run_from_env()
