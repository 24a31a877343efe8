"""Initial schema: organizations, API keys, agents and versions, telephony configurations, runs.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _json(name: str) -> sa.Column:
    return sa.Column(name, sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False)


def _org_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["organization_id"], ["organizations.id"], ondelete="CASCADE",
                                   name=f"fk_{table}_organization_id_organizations")


def upgrade() -> None:
    op.create_table(
        "organizations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("concurrent_call_limit", sa.Integer(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_organizations"),
    )

    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("organization_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        _ts("created_at"),
        _ts("last_used_at", nullable=True),
        _ts("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        _org_fk("api_keys"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    op.create_index("ix_api_keys_organization_id", "api_keys", ["organization_id"])

    op.create_table(
        "agents",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("uuid", sa.String(36), nullable=False),
        sa.Column("organization_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        _json("draft_definition"),
        sa.Column("published_version", sa.Integer(), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_agents"),
        _org_fk("agents"),
        sa.UniqueConstraint("uuid", name="uq_agents_uuid"),
    )
    op.create_index("ix_agents_organization_id", "agents", ["organization_id"])

    op.create_table(
        "agent_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("agent_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        _json("definition"),
        _ts("published_at"),
        sa.PrimaryKeyConstraint("id", name="pk_agent_versions"),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], ondelete="CASCADE",
                                name="fk_agent_versions_agent_id_agents"),
        sa.UniqueConstraint("agent_id", "version", name="uq_agent_versions_agent_id_version"),
    )

    op.create_table(
        "telephony_configurations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("organization_id", sa.Integer(), nullable=False),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("account_id", sa.String(255), nullable=False),
        _json("credentials"),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_telephony_configurations"),
        _org_fk("telephony_configurations"),
        sa.UniqueConstraint("organization_id", "provider", "account_id",
                            name="uq_telephony_configurations_organization_id_provider_account_id"),
    )
    op.create_index("ix_telephony_configurations_organization_id", "telephony_configurations", ["organization_id"])
    op.create_index("ix_telephony_configurations_account_id", "telephony_configurations", ["account_id"])

    op.create_table(
        "workflow_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("organization_id", sa.Integer(), nullable=False),
        sa.Column("agent_uuid", sa.String(36), nullable=False),
        sa.Column("agent_version", sa.Integer(), nullable=True),
        sa.Column("definition_source", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("call_id", sa.String(200), nullable=True),
        sa.Column("call_type", sa.String(16), nullable=False),
        sa.Column("mode", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("end_reason", sa.Text(), nullable=True),
        sa.Column("telephony_configuration_id", sa.Integer(), nullable=True),
        _json("initial_context"),
        _json("gathered_context"),
        _json("logs"),
        sa.Column("quota_lease_id", sa.String(64), nullable=True),
        _ts("created_at"),
        _ts("started_at", nullable=True),
        _ts("ended_at", nullable=True),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_workflow_runs"),
        _org_fk("workflow_runs"),
        sa.ForeignKeyConstraint(["telephony_configuration_id"], ["telephony_configurations.id"],
                                ondelete="SET NULL",
                                name="fk_workflow_runs_telephony_configuration_id"),
    )
    op.create_index("ix_workflow_runs_organization_id_agent_uuid", "workflow_runs", ["organization_id", "agent_uuid"])
    op.create_index("ix_workflow_runs_call_id", "workflow_runs", ["call_id"])
    op.create_index("ix_workflow_runs_state", "workflow_runs", ["state"])
    op.create_index("ix_workflow_runs_telephony_configuration_id", "workflow_runs", ["telephony_configuration_id"])

    op.create_table(
        "processed_events",
        sa.Column("event_id", sa.String(64), nullable=False),
        _ts("processed_at"),
        sa.PrimaryKeyConstraint("event_id", name="pk_processed_events"),
    )
    op.create_index("ix_processed_events_processed_at", "processed_events", ["processed_at"])


def downgrade() -> None:
    op.drop_table("processed_events")
    op.drop_table("workflow_runs")
    op.drop_table("telephony_configurations")
    op.drop_table("agent_versions")
    op.drop_table("agents")
    op.drop_table("api_keys")
    op.drop_table("organizations")
