"""Initial schema: devices (one key each), API keys, per-device counters, the replay ledger.

This is exactly what `Base.metadata.create_all` produced before migrations existed; such registries (no
alembic_version table) are stamped at this revision by `cloud_ingest.migrations.upgrade` and upgraded from here.

Revision ID: 0001
Revises:
Create Date: 2024-06-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device",
        sa.Column("vin", sa.String(32), nullable=False),
        sa.Column("public_key", sa.LargeBinary(32), nullable=False),
        sa.Column("key_id", sa.LargeBinary(8), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("label", sa.String(200), nullable=True),
        sa.PrimaryKeyConstraint("vin", name="pk_device"),
    )
    op.create_table(
        "api_key",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_api_key"),
        sa.UniqueConstraint("key_hash", name="uq_api_key_key_hash"),
        sa.CheckConstraint("role IN ('admin', 'operator', 'viewer')", name="ck_api_key_role"),
    )
    op.create_table(
        "device_state",
        sa.Column("vin", sa.String(32), nullable=False),
        sa.Column("last_seen_ms", sa.BigInteger(), nullable=True),
        sa.Column("last_boot", sa.BigInteger(), nullable=True),
        sa.Column("messages", sa.BigInteger(), nullable=False),
        sa.Column("samples", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("vin", name="pk_device_state"),
    )
    op.create_table(
        "boot_window",
        sa.Column("vin", sa.String(32), nullable=False),
        sa.Column("boot", sa.BigInteger(), nullable=False),
        sa.Column("hwm_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("vin", "boot", name="pk_boot_window"),
    )
    op.create_table(
        "message_ledger",
        sa.Column("vin", sa.String(32), nullable=False),
        sa.Column("boot", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("vin", "boot", "seq", name="pk_message_ledger"),
    )


def downgrade() -> None:
    for table in ("message_ledger", "boot_window", "device_state", "api_key", "device"):
        op.drop_table(table)
