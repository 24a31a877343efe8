"""Programmatic Alembic: the migrations ship inside the package and run against the service's engine."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("voicebus.config.migrate")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Arbitrary constant: every replica that starts at once takes this PostgreSQL advisory lock, so
# exactly one runs the migrations and the others then find the schema already at head.
_PG_MIGRATION_LOCK = 0x766F6963  # "voic"


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def _lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})


def _upgrade(conn: Connection, revision: str) -> None:
    _lock(conn)
    command.upgrade(alembic_config(conn), revision)


def _downgrade(conn: Connection, revision: str) -> None:
    _lock(conn)
    command.downgrade(alembic_config(conn), revision)


def _current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    before = await current_revision(engine)
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade, revision)
    after = await current_revision(engine)
    if before != after:
        log.info("database schema migrated from %s to %s", before or "empty", after)
    else:
        log.debug("database schema already at %s", after)


async def downgrade(engine: AsyncEngine, revision: str = "base") -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_downgrade, revision)


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(_current)
