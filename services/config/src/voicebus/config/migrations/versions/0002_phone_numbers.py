"""Phone numbers: a number (E.164) on a telephony configuration's carrier account, routed to an agent.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "phone_numbers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("organization_id", sa.Integer(), nullable=False),
        sa.Column("telephony_configuration_id", sa.Integer(), nullable=False),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("account_id", sa.String(255), nullable=False),
        sa.Column("number", sa.String(16), nullable=False),
        sa.Column("agent_uuid", sa.String(36), nullable=False),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_phone_numbers"),
        sa.ForeignKeyConstraint(["organization_id"], ["organizations.id"], ondelete="CASCADE",
                                name="fk_phone_numbers_organization_id_organizations"),
        # No ON DELETE: the service refuses (409) to delete a configuration that still has numbers.
        sa.ForeignKeyConstraint(["telephony_configuration_id"], ["telephony_configurations.id"],
                                name="fk_phone_numbers_telephony_configuration_id"),
        sa.UniqueConstraint("provider", "account_id", "number", name="uq_phone_numbers_provider_account_id_number"),
    )
    op.create_index("ix_phone_numbers_organization_id", "phone_numbers", ["organization_id"])
    op.create_index("ix_phone_numbers_telephony_configuration_id", "phone_numbers", ["telephony_configuration_id"])


def downgrade() -> None:
    op.drop_table("phone_numbers")
