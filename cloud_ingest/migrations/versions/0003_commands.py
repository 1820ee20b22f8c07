"""Commands and vehicle status: the signed-command outbox with its acks, and the newest status per vehicle.

Tables of cloud_ingest/commands.py (the control plane, firmware_specs/COMMANDS.md).

Revision ID: 0003
Revises: 0002
Create Date: 2024-06-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "command_outbox",
        sa.Column("command_id", sa.String(32), nullable=False),
        sa.Column("vin", sa.String(32), nullable=False),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("args_json", sa.Text(), nullable=False),
        sa.Column("issued_ms", sa.BigInteger(), nullable=False),
        sa.Column("expires_ms", sa.BigInteger(), nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("claimed_until_ms", sa.BigInteger(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("sent_ms", sa.BigInteger(), nullable=True),
        sa.Column("ack_status", sa.String(16), nullable=True),
        sa.Column("ack_detail", sa.String(200), nullable=True),
        sa.Column("acted_ms", sa.BigInteger(), nullable=True),
        sa.Column("acked_ms", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("command_id", name="pk_command_outbox"),
    )
    op.create_index("ix_command_outbox_unsent", "command_outbox", ["sent_ms", "expires_ms"])
    op.create_index("ix_command_outbox_vin_issued", "command_outbox", ["vin", "issued_ms"])
    op.create_table(
        "vehicle_status",
        sa.Column("vin", sa.String(32), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("boot", sa.BigInteger(), nullable=False),
        sa.Column("conn", sa.BigInteger(), nullable=False),
        sa.Column("offline", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("received_ms", sa.BigInteger(), nullable=False),
        sa.Column("agent", sa.String(64), nullable=False),
        sa.Column("metrics_json", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("vin", name="pk_vehicle_status"),
    )


def downgrade() -> None:
    op.drop_table("vehicle_status")
    op.drop_index("ix_command_outbox_vin_issued", table_name="command_outbox")
    op.drop_index("ix_command_outbox_unsent", table_name="command_outbox")
    op.drop_table("command_outbox")
