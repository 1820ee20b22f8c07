"""Life cycles and geofences: vehicle life-cycle state, the battery registry, the life-cycle history, and geofences
with the generation counter their spatial indexes poll.

Tables of cloud_ingest/lifecycle.py and cloud_ingest/geofences.py (docs/LIFECYCLE.md).

Revision ID: 0005
Revises: 0004
Create Date: 2024-06-12
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_VEHICLE_STATES = (
    "manufactured",
    "sold",
    "registered",
    "active",
    "locked",
    "stolen",
    "in_repair",
    "transferred",
    "expired",
    "trade_in",
    "deregistered",
    "scrapped",
)
_BATTERY_STATES = (
    "manufactured",
    "paired",
    "in_service",
    "warning",
    "quarantined",
    "inspected",
    "retired",
    "recycled",
    "lost",
)


def _in(column: str, values: tuple[str, ...]) -> str:
    # Spelled out here rather than imported: a revision must keep meaning what it meant when it was written.
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def upgrade() -> None:
    op.create_table(
        "vehicle_lifecycle",
        sa.Column("vin", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("since_ms", sa.BigInteger(), nullable=False),
        sa.Column("activity", sa.String(16), nullable=True),
        sa.Column("activity_since_ms", sa.BigInteger(), nullable=True),
        sa.Column("pending_activity", sa.String(16), nullable=True),
        sa.Column("pending_since_ms", sa.BigInteger(), nullable=True),
        sa.Column("battery_barcode", sa.String(64), nullable=True),
        sa.Column("odometer_m", sa.Float(), nullable=False),
        sa.Column("next_service_m", sa.Float(), nullable=False),
        sa.Column("maintenance_due", sa.Boolean(), nullable=False),
        sa.Column("last_ts_ms", sa.BigInteger(), nullable=True),
        sa.Column("speed_ts_ms", sa.BigInteger(), nullable=True),
        sa.Column("speed_kmh", sa.Float(), nullable=True),
        sa.Column("current_a", sa.Float(), nullable=True),
        sa.CheckConstraint(_in("state", _VEHICLE_STATES), name="ck_vehicle_lifecycle_state"),
        sa.ForeignKeyConstraint(["vin"], ["device.vin"], name="fk_vehicle_lifecycle_vin_device"),
        sa.PrimaryKeyConstraint("vin", name="pk_vehicle_lifecycle"),
    )
    op.create_table(
        "batteries",
        sa.Column("barcode", sa.String(64), nullable=False),
        sa.Column("registered", sa.Boolean(), nullable=False),
        sa.Column("chemistry", sa.String(16), nullable=True),
        sa.Column("capacity_ah", sa.Float(), nullable=True),
        sa.Column("cells", sa.Integer(), nullable=True),
        sa.Column("rated_cycles", sa.Integer(), nullable=True),
        sa.Column("manufactured_ms", sa.BigInteger(), nullable=True),
        sa.Column("service_life_years", sa.Float(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("since_ms", sa.BigInteger(), nullable=False),
        sa.Column("vin", sa.String(32), nullable=True),
        sa.Column("soh_pct", sa.Float(), nullable=True),
        sa.Column("soh_confirmed_pct", sa.Float(), nullable=True),
        sa.Column("cycles", sa.Integer(), nullable=True),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(_in("state", _BATTERY_STATES), name="ck_batteries_state"),
        sa.ForeignKeyConstraint(["vin"], ["device.vin"], name="fk_batteries_vin_device"),
        sa.PrimaryKeyConstraint("barcode", name="pk_batteries"),
    )
    op.create_index("ix_batteries_vin", "batteries", ["vin"])
    op.create_table(
        "lifecycle_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("entity_kind", sa.String(8), nullable=False),
        sa.Column("entity_id", sa.String(64), nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("from_state", sa.String(16), nullable=True),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("ts_ms", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(10), nullable=False),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("note", sa.String(500), nullable=True),
        sa.Column("related", sa.String(64), nullable=True),
        sa.CheckConstraint("entity_kind IN ('vehicle', 'battery')", name="ck_lifecycle_events_entity_kind"),
        sa.CheckConstraint("source IN ('telemetry', 'api')", name="ck_lifecycle_events_source"),
        sa.PrimaryKeyConstraint("id", name="pk_lifecycle_events"),
    )
    op.create_index("ix_lifecycle_events_entity", "lifecycle_events", ["entity_kind", "entity_id", "ts_ms"])
    op.create_table(
        "geofences",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("shape", sa.String(16), nullable=False),
        sa.Column("geometry", sa.Text(), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("kind IN ('no_charging', 'speed_limit', 'restricted')", name="ck_geofences_kind"),
        sa.CheckConstraint("shape IN ('polygon', 'circle', 'corridor')", name="ck_geofences_shape"),
        sa.PrimaryKeyConstraint("id", name="pk_geofences"),
    )
    generation = op.create_table(
        "geofence_generation",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_geofence_generation"),
    )
    op.bulk_insert(generation, [{"id": 1, "generation": 0}])


def downgrade() -> None:
    op.drop_table("geofence_generation")
    op.drop_table("geofences")
    op.drop_index("ix_lifecycle_events_entity", table_name="lifecycle_events")
    op.drop_table("lifecycle_events")
    op.drop_index("ix_batteries_vin", table_name="batteries")
    op.drop_table("batteries")
    op.drop_table("vehicle_lifecycle")
