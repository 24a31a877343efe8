"""Engine creation for the two supported databases.

SQLite is the embedded default and PostgreSQL the production database; everything that differs
between them (URL schemes, foreign keys, write locking, time zones) is settled here so the rest of
the service writes one kind of SQLAlchemy code.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import StaticPool

SQLITE_BUSY_TIMEOUT_S = 30


class DatabaseUrlError(ValueError):
    pass


def normalize_database_url(url: str) -> str:
    """Map the URL forms people paste (``postgres://``, ``postgresql://``, ``sqlite:///``) to async drivers."""
    url = url.strip()
    if not url:
        raise DatabaseUrlError("DATABASE_URL is empty")
    for plain in ("postgres://", "postgresql://", "postgresql+psycopg2://", "postgresql+psycopg://"):
        if url.startswith(plain):
            url = "postgresql+asyncpg://" + url[len(plain):]
            break
    if url.startswith("sqlite://") and not url.startswith("sqlite+aiosqlite://"):
        url = "sqlite+aiosqlite://" + url[len("sqlite://"):]
    try:
        parsed = make_url(url)
    except Exception as e:
        raise DatabaseUrlError(f"DATABASE_URL is not a valid database URL: {e}") from None
    if parsed.drivername == "postgresql+asyncpg":
        query = dict(parsed.query)
        # libpq's sslmode means nothing to asyncpg; its ``ssl`` takes the same values.
        if "sslmode" in query:
            query["ssl"] = query.pop("sslmode")
            parsed = parsed.set(query=query)
        return parsed.render_as_string(hide_password=False)
    if parsed.drivername == "sqlite+aiosqlite":
        return url
    raise DatabaseUrlError(
        f"unsupported DATABASE_URL scheme {parsed.drivername!r}; use postgresql://… or sqlite+aiosqlite:///path"
    )


def is_sqlite(url: str | URL) -> bool:
    return make_url(str(url) if isinstance(url, URL) else url).get_backend_name() == "sqlite"


def _sqlite_path(url: URL) -> Path | None:
    db = url.database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


def create_engine(url: str, **kw: Any) -> AsyncEngine:
    """An async engine; for SQLite also the file's directory, foreign keys and serialized writes."""
    url = normalize_database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_async_engine(url, pool_pre_ping=True, **kw)

    path = _sqlite_path(parsed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    else:  # in-memory: every pooled connection would otherwise see its own empty database
        kw.setdefault("poolclass", StaticPool)
    engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, **kw)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let us issue BEGIN ourselves (below); the driver's implicit BEGIN is DEFERRED.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        if path is not None:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock up front, so two read-modify-write transactions (an API
        # edit and an event merge into the same run) queue on busy_timeout instead of one failing
        # with "database is locked" when it upgrades from reader to writer.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[Any]:
    return async_sessionmaker(engine, expire_on_commit=False)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC in and out; SQLite stores no zone, so naive values read back are UTC."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def json_type() -> sa.types.TypeEngine[Any]:
    """JSON everywhere, JSONB on PostgreSQL (indexable, compact)."""
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)
