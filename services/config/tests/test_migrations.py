"""Migrations upgrade -> downgrade -> upgrade on SQLite and PostgreSQL, and agree with the models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from voicebus.config.db import DatabaseUrlError, create_engine, normalize_database_url
from voicebus.config.migrate import current_revision, downgrade, head_revision, upgrade
from voicebus.config.models import Base

TABLES = {"organizations", "api_keys", "agents", "agent_versions", "telephony_configurations",
          "workflow_runs", "processed_events", "phone_numbers"}

COLUMNS = {
    "organizations": {"id", "name", "concurrent_call_limit", "created_at"},
    "api_keys": {"id", "organization_id", "name", "prefix", "key_hash", "created_at", "last_used_at", "revoked_at"},
    "agents": {"id", "uuid", "organization_id", "name", "draft_definition", "published_version", "created_at",
               "updated_at"},
    "agent_versions": {"id", "agent_id", "version", "definition", "published_at"},
    "telephony_configurations": {"id", "organization_id", "provider", "name", "account_id", "credentials",
                                 "created_at", "updated_at"},
    "workflow_runs": {"id", "organization_id", "agent_uuid", "agent_version", "definition_source", "name", "call_id",
                      "call_type", "mode", "state", "end_reason", "telephony_configuration_id", "initial_context",
                      "gathered_context", "logs", "quota_lease_id", "created_at", "started_at", "ended_at",
                      "updated_at"},
    "processed_events": {"event_id", "processed_at"},
    "phone_numbers": {"id", "organization_id", "telephony_configuration_id", "provider", "account_id", "number",
                      "agent_uuid", "is_active", "created_at", "updated_at"},
}


@pytest.fixture
def fresh_pg(pg_databases: Any) -> str:
    """A database of its own: downgrading must not pull tables from under other tests."""
    return pg_databases.create("vb_mig", plain=True)  # plain postgresql:// on purpose


@pytest.fixture(params=["sqlite", "postgres"])
def mig_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "fresh_pg")


def _schema(sync_conn: sa.Connection) -> dict[str, Any]:
    insp = sa.inspect(sync_conn)
    out: dict[str, Any] = {}
    for t in insp.get_table_names():
        out[t] = {
            "columns": {c["name"] for c in insp.get_columns(t)},
            "unique": {tuple(u["column_names"]) for u in insp.get_unique_constraints(t)},
            "indexes": {tuple(i["column_names"]) for i in insp.get_indexes(t)},
            "fks": {(tuple(f["constrained_columns"]), f["referred_table"], (f.get("options") or {}).get("ondelete"))
                    for f in insp.get_foreign_keys(t)},
            "pk": tuple(insp.get_pk_constraint(t)["constrained_columns"]),
        }
    return out


def _diffs(sync_conn: sa.Connection) -> list[Any]:
    return compare_metadata(MigrationContext.configure(sync_conn, opts={"compare_type": True}), Base.metadata)


async def test_upgrade_downgrade_upgrade(mig_url: str) -> None:
    engine = create_engine(mig_url)
    try:
        assert await current_revision(engine) is None
        await upgrade(engine)
        assert await current_revision(engine) == head_revision()
        async with engine.connect() as conn:
            first = await conn.run_sync(_schema)
            diffs = await conn.run_sync(_diffs)
        assert TABLES <= set(first)
        for table, cols in COLUMNS.items():
            assert first[table]["columns"] == cols, table
        assert ("organization_id", "provider", "account_id") in first["telephony_configurations"]["unique"]
        assert ("agent_id", "version") in first["agent_versions"]["unique"]
        assert ("uuid",) in first["agents"]["unique"]
        assert ("key_hash",) in first["api_keys"]["unique"]
        assert ("account_id",) in first["telephony_configurations"]["indexes"]
        assert first["processed_events"]["pk"] == ("event_id",)
        run_fks = first["workflow_runs"]["fks"]
        assert (("telephony_configuration_id",), "telephony_configurations", "SET NULL") in run_fks
        assert ("provider", "account_id", "number") in first["phone_numbers"]["unique"]
        number_fks = {f[:2] for f in first["phone_numbers"]["fks"]}
        assert number_fks == {(("organization_id",), "organizations"),
                              (("telephony_configuration_id",), "telephony_configurations")}
        assert head_revision() == "0002"
        assert diffs == [], f"models and migrations disagree: {diffs}"

        await downgrade(engine)
        assert await current_revision(engine) is None
        async with engine.connect() as conn:
            after_down = await conn.run_sync(_schema)
        assert not (TABLES & set(after_down))

        await upgrade(engine)
        async with engine.connect() as conn:
            again = await conn.run_sync(_schema)
        assert {t: again[t] for t in TABLES} == {t: first[t] for t in TABLES}
        await upgrade(engine)  # at head already: a no-op, not an error
        assert await current_revision(engine) == head_revision()
    finally:
        await engine.dispose()


async def test_phone_numbers_migration_steps_down_to_0001_and_back(mig_url: str) -> None:
    """0002 alone: down to 0001 removes only phone_numbers (existing data stays), up adds it again."""
    engine = create_engine(mig_url)
    try:
        await upgrade(engine)
        async with engine.begin() as conn:
            await conn.execute(sa.text("INSERT INTO organizations (name, concurrent_call_limit, created_at) "
                                       "VALUES ('kept', 3, CURRENT_TIMESTAMP)"))
        await downgrade(engine, "0001")
        assert await current_revision(engine) == "0001"
        async with engine.connect() as conn:
            tables = set(await conn.run_sync(_schema))
            kept = await conn.scalar(sa.text("SELECT name FROM organizations"))
        assert "phone_numbers" not in tables and TABLES - {"phone_numbers"} <= tables
        assert kept == "kept"
        await upgrade(engine)
        assert await current_revision(engine) == "0002"
        async with engine.connect() as conn:
            assert "phone_numbers" in set(await conn.run_sync(_schema))
            assert await conn.run_sync(_diffs) == []
    finally:
        await engine.dispose()


async def test_database_refuses_a_number_twice_on_one_account(mig_url: str) -> None:
    """The uniqueness holds in the database itself (across organizations), not only in the service."""
    engine = create_engine(mig_url)
    try:
        await upgrade(engine)
        async with engine.begin() as conn:
            for org in (1, 2):
                await conn.execute(sa.text("INSERT INTO organizations (id, name, concurrent_call_limit, created_at) "
                                           "VALUES (:i, 'o', 3, CURRENT_TIMESTAMP)"), {"i": org})
                await conn.execute(sa.text(
                    "INSERT INTO telephony_configurations (id, organization_id, provider, name, account_id, "
                    "credentials, created_at, updated_at) VALUES (:i, :i, 'cloudonix', 'c', 'acme', '{}', "
                    "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"), {"i": org})
        insert = sa.text("INSERT INTO phone_numbers (organization_id, telephony_configuration_id, provider, account_id,"
                         " number, agent_uuid, is_active, created_at, updated_at) VALUES (:o, :o, 'cloudonix', "
                         "'acme', '+14155550100', 'a', true, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)")
        async with engine.begin() as conn:
            await conn.execute(insert, {"o": 1})
        with pytest.raises(sa.exc.IntegrityError):
            async with engine.begin() as conn:
                await conn.execute(insert, {"o": 2})
        with pytest.raises(sa.exc.IntegrityError):  # the configuration cannot go while it has numbers
            async with engine.begin() as conn:
                await conn.execute(sa.text("DELETE FROM telephony_configurations WHERE id = 1"))
    finally:
        await engine.dispose()


async def test_sqlite_enforces_foreign_keys(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    try:
        await upgrade(engine)
        with pytest.raises(sa.exc.IntegrityError):
            async with engine.begin() as conn:
                await conn.execute(sa.text(
                    "INSERT INTO api_keys (organization_id, name, prefix, key_hash, created_at) "
                    "VALUES (999, 'k', 'p', 'h', CURRENT_TIMESTAMP)"))
    finally:
        await engine.dispose()


async def test_sqlite_parent_directory_is_created(tmp_path: Path) -> None:
    db = tmp_path / "nested" / "dir" / "voicebus.db"
    engine = create_engine(f"sqlite+aiosqlite:///{db}")
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()
    assert db.is_file()


@pytest.mark.parametrize(("given", "expected"), [
    ("postgres://u:p@h:5432/db", "postgresql+asyncpg://u:p@h:5432/db"),
    ("postgresql://u@h/db", "postgresql+asyncpg://u@h/db"),
    ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
    ("postgresql://u@h/db?sslmode=require", "postgresql+asyncpg://u@h/db?ssl=require"),
    ("sqlite:///./x.db", "sqlite+aiosqlite:///./x.db"),
    ("sqlite+aiosqlite:///./.voicebus/voicebus.db", "sqlite+aiosqlite:///./.voicebus/voicebus.db"),
])
def test_database_url_normalization(given: str, expected: str) -> None:
    assert normalize_database_url(given) == expected


@pytest.mark.parametrize("bad", ["", "mysql://u@h/db", "not a url"])
def test_bad_database_url_is_refused_clearly(bad: str) -> None:
    with pytest.raises(DatabaseUrlError) as e:
        normalize_database_url(bad)
    assert "DATABASE_URL" in str(e.value)
