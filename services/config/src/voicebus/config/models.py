"""ORM models. The schema itself is owned by the Alembic migrations in ``migrations/``; a test checks
that these models and the migrated schema agree."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from voicebus.config.db import UTCDateTime, json_type, utcnow

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING)


def _json() -> Mapped[dict[str, Any]]:
    return mapped_column(json_type(), nullable=False, default=dict)


class Organization(Base):
    __tablename__ = "organizations"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), nullable=False)
    concurrent_call_limit: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    organization_id: Mapped[int] = mapped_column(
        sa.ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False, index=True
    )
    name: Mapped[str] = mapped_column(sa.String(200), nullable=False)
    prefix: Mapped[str] = mapped_column(sa.String(32), nullable=False)
    key_hash: Mapped[str] = mapped_column(sa.String(64), nullable=False, unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Agent(Base):
    __tablename__ = "agents"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    uuid: Mapped[str] = mapped_column(sa.String(36), nullable=False, unique=True)
    organization_id: Mapped[int] = mapped_column(
        sa.ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False, index=True
    )
    name: Mapped[str] = mapped_column(sa.String(200), nullable=False)
    draft_definition: Mapped[dict[str, Any]] = _json()
    published_version: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class AgentVersion(Base):
    __tablename__ = "agent_versions"
    __table_args__ = (sa.UniqueConstraint("agent_id", "version"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    agent_id: Mapped[int] = mapped_column(sa.ForeignKey("agents.id", ondelete="CASCADE"), nullable=False)
    version: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    definition: Mapped[dict[str, Any]] = _json()
    published_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class TelephonyConfiguration(Base):
    __tablename__ = "telephony_configurations"
    __table_args__ = (sa.UniqueConstraint("organization_id", "provider", "account_id"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    organization_id: Mapped[int] = mapped_column(
        sa.ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False, index=True
    )
    provider: Mapped[str] = mapped_column(sa.String(32), nullable=False)
    name: Mapped[str] = mapped_column(sa.String(64), nullable=False)
    account_id: Mapped[str] = mapped_column(sa.String(255), nullable=False, index=True)
    credentials: Mapped[dict[str, Any]] = _json()
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class PhoneNumber(Base):
    """A number on a carrier account that routes to an agent. ``provider`` and ``account_id`` copy the
    configuration's (kept in step when its account id changes) so the database itself enforces that a
    number exists once per carrier account, across organizations: an inbound call has one route."""

    __tablename__ = "phone_numbers"
    __table_args__ = (sa.UniqueConstraint("provider", "account_id", "number"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    organization_id: Mapped[int] = mapped_column(
        sa.ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False, index=True
    )
    telephony_configuration_id: Mapped[int] = mapped_column(
        sa.ForeignKey("telephony_configurations.id",
                      name="fk_phone_numbers_telephony_configuration_id"),  # the convention's name is > 63 chars
        nullable=False, index=True
    )
    provider: Mapped[str] = mapped_column(sa.String(32), nullable=False)
    account_id: Mapped[str] = mapped_column(sa.String(255), nullable=False)
    number: Mapped[str] = mapped_column(sa.String(16), nullable=False)
    agent_uuid: Mapped[str] = mapped_column(sa.String(36), nullable=False)
    is_active: Mapped[bool] = mapped_column(sa.Boolean, nullable=False, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class WorkflowRun(Base):
    __tablename__ = "workflow_runs"
    __table_args__ = (sa.Index("ix_workflow_runs_organization_id_agent_uuid", "organization_id", "agent_uuid"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    organization_id: Mapped[int] = mapped_column(
        sa.ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False
    )
    agent_uuid: Mapped[str] = mapped_column(sa.String(36), nullable=False)
    agent_version: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    definition_source: Mapped[str] = mapped_column(sa.String(16), nullable=False)
    name: Mapped[str] = mapped_column(sa.String(200), nullable=False)
    call_id: Mapped[str | None] = mapped_column(sa.String(200), nullable=True, index=True)
    call_type: Mapped[str] = mapped_column(sa.String(16), nullable=False)
    mode: Mapped[str] = mapped_column(sa.String(32), nullable=False)
    state: Mapped[str] = mapped_column(sa.String(16), nullable=False, index=True)
    end_reason: Mapped[str | None] = mapped_column(sa.Text, nullable=True)
    telephony_configuration_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("telephony_configurations.id", ondelete="SET NULL",
                      name="fk_workflow_runs_telephony_configuration_id"),  # the convention's name is > 63 chars
        nullable=True, index=True
    )
    initial_context: Mapped[dict[str, Any]] = _json()
    gathered_context: Mapped[dict[str, Any]] = _json()
    logs: Mapped[dict[str, Any]] = _json()
    quota_lease_id: Mapped[str | None] = mapped_column(sa.String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class ProcessedEvent(Base):
    __tablename__ = "processed_events"

    event_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    processed_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow, index=True)
