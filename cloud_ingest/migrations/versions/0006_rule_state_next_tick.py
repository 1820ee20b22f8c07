"""Rule state: when a vehicle's time-based rules are next due (`rule_state.next_tick_ms`), so the periodic task
ticks only the vehicles that are due instead of every silent one (cloud_ingest/alarms.py).

Existing rows get their newest sample time: each is ticked once and rescheduled from there.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rule_state") as batch:
        batch.add_column(sa.Column("next_tick_ms", sa.BigInteger(), nullable=True))
    op.create_index("ix_rule_state_next_tick_ms", "rule_state", ["next_tick_ms"])
    op.execute("UPDATE rule_state SET next_tick_ms = last_ts")


def downgrade() -> None:
    op.drop_index("ix_rule_state_next_tick_ms", table_name="rule_state")
    with op.batch_alter_table("rule_state") as batch:
        batch.drop_column("next_tick_ms")
