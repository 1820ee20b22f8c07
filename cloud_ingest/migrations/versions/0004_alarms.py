"""Hazard alarms: vehicle profiles (rule context), persisted rule-engine state, alarms with their audit trail, and
the notification outbox.

Tables of cloud_ingest/alarms.py and cloud_ingest/notify.py, plus `vehicle_profile` (cloud_ingest/db.py).

Revision ID: 0004
Revises: 0003
Create Date: 2024-06-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vehicle_profile",
        sa.Column("vin", sa.String(32), nullable=False),
        sa.Column("model", sa.String(32), nullable=True),
        sa.Column("variant", sa.String(64), nullable=True),
        sa.Column("chemistry", sa.String(8), nullable=True),
        sa.Column("battery_barcodes_json", sa.Text(), nullable=False),
        sa.Column("battery_capacity_ah", sa.Float(), nullable=True),
        sa.Column("battery_cell_count", sa.Integer(), nullable=True),
        sa.Column("battery_manufactured_ms", sa.BigInteger(), nullable=True),
        sa.Column("battery_service_life_years", sa.Float(), nullable=True),
        sa.Column("speed_limit_kmh", sa.Float(), nullable=True),
        sa.Column("wheel_inch", sa.Float(), nullable=True),
        sa.Column("locked", sa.Boolean(), nullable=True),
        sa.Column("reporting_interval_s", sa.Float(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["vin"], ["device.vin"], name="fk_vehicle_profile_vin_device"),
        sa.PrimaryKeyConstraint("vin", name="pk_vehicle_profile"),
    )
    op.create_table(
        "rule_state",
        sa.Column("vin", sa.String(32), nullable=False),
        sa.Column("state_json", sa.Text(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("last_ts", sa.BigInteger(), nullable=True),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("vin", name="pk_rule_state"),
    )
    op.create_index("ix_rule_state_last_ts", "rule_state", ["last_ts"])
    op.create_table(
        "alarms",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("vin", sa.String(32), nullable=False),
        sa.Column("rule", sa.String(64), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("opened_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_ms", sa.BigInteger(), nullable=False),
        sa.Column("cleared_ms", sa.BigInteger(), nullable=True),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("peak", sa.Float(), nullable=True),
        sa.Column("peak_ms", sa.BigInteger(), nullable=True),
        sa.Column("detail_json", sa.Text(), nullable=False),
        sa.Column("assignee", sa.String(100), nullable=True),
        sa.Column("deadline_ms", sa.BigInteger(), nullable=True),
        sa.Column("escalated_ms", sa.BigInteger(), nullable=True),
        sa.Column("closed_ms", sa.BigInteger(), nullable=True),
        sa.Column("reopen_count", sa.Integer(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.CheckConstraint(
            "state IN ('DETECTED', 'ACKNOWLEDGED', 'RECTIFYING', 'VERIFIED', 'CLOSED', 'ESCALATED', 'REOPENED')",
            name="ck_alarms_state",
        ),
        sa.CheckConstraint("level BETWEEN 1 AND 3", name="ck_alarms_level"),
        sa.PrimaryKeyConstraint("id", name="pk_alarms"),
    )
    op.create_index("ix_alarms_vin_rule", "alarms", ["vin", "rule"])
    op.create_index("ix_alarms_state_deadline", "alarms", ["state", "deadline_ms"])
    op.create_index("ix_alarms_opened_ms", "alarms", ["opened_ms"])
    # At most one alarm per (vehicle, rule) that is not CLOSED: the database enforces what the service decides.
    op.create_index(
        "uq_alarms_open",
        "alarms",
        ["vin", "rule"],
        unique=True,
        sqlite_where=sa.text("state <> 'CLOSED'"),
        postgresql_where=sa.text("state <> 'CLOSED'"),
    )
    op.create_table(
        "alarm_transitions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("alarm_id", sa.Integer(), nullable=False),
        sa.Column("at_ms", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("from_state", sa.String(16), nullable=True),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("note", sa.String(1000), nullable=True),
        sa.ForeignKeyConstraint(["alarm_id"], ["alarms.id"], name="fk_alarm_transitions_alarm_id_alarms"),
        sa.PrimaryKeyConstraint("id", name="pk_alarm_transitions"),
    )
    op.create_index("ix_alarm_transitions_alarm_id", "alarm_transitions", ["alarm_id"])
    op.create_table(
        "alarm_outbox",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("vin", sa.String(32), nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(12), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_ms", sa.BigInteger(), nullable=False),
        sa.Column("claimed_until_ms", sa.BigInteger(), nullable=True),
        sa.Column("done_ms", sa.BigInteger(), nullable=True),
        sa.Column("last_error", sa.String(200), nullable=True),
        sa.CheckConstraint("state IN ('pending', 'delivered', 'failed', 'dropped')", name="ck_alarm_outbox_state"),
        sa.PrimaryKeyConstraint("id", name="pk_alarm_outbox"),
    )
    op.create_index("ix_alarm_outbox_pending", "alarm_outbox", ["channel", "state", "next_attempt_ms"])


def downgrade() -> None:
    op.drop_index("ix_alarm_outbox_pending", table_name="alarm_outbox")
    op.drop_table("alarm_outbox")
    op.drop_index("ix_alarm_transitions_alarm_id", table_name="alarm_transitions")
    op.drop_table("alarm_transitions")
    op.drop_index("uq_alarms_open", table_name="alarms")
    op.drop_index("ix_alarms_opened_ms", table_name="alarms")
    op.drop_index("ix_alarms_state_deadline", table_name="alarms")
    op.drop_index("ix_alarms_vin_rule", table_name="alarms")
    op.drop_table("alarms")
    op.drop_index("ix_rule_state_last_ts", table_name="rule_state")
    op.drop_table("rule_state")
    op.drop_table("vehicle_profile")
