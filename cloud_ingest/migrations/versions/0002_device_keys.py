"""Device keys: several signing keys per device (rotation) with revocation, in `device_keys`.

Each device's single key moves from `device.public_key`/`device.key_id` into a `device_keys` row (active), and
those two columns go. Downgrading keeps one key per device (the newest active one, else the newest) and drops
the rest of the key history.

Revision ID: 0002
Revises: 0001
Create Date: 2024-06-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# SQL, not Python, so `alembic upgrade --sql` can render it: key ids become lowercase hex strings.
_HEX = {"sqlite": "lower(hex(key_id))", "postgresql": "encode(key_id, 'hex')"}


def upgrade() -> None:
    op.create_table(
        "device_keys",
        sa.Column("vin", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("public_key", sa.LargeBinary(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["vin"], ["device.vin"], name="fk_device_keys_vin_device"),
        sa.PrimaryKeyConstraint("vin", "key_id", name="pk_device_keys"),
    )
    dialect = op.get_context().dialect.name
    if dialect not in _HEX:
        raise NotImplementedError(f"revision 0002 knows no hex() for {dialect}")
    op.execute(
        "INSERT INTO device_keys (vin, key_id, public_key, created_at, revoked_at) "
        f"SELECT vin, {_HEX[dialect]}, public_key, registered_at, NULL FROM device"
    )
    with op.batch_alter_table("device") as batch:
        batch.drop_column("key_id")
        batch.drop_column("public_key")


def downgrade() -> None:
    with op.batch_alter_table("device") as batch:
        batch.add_column(sa.Column("public_key", sa.LargeBinary(32), nullable=True))
        batch.add_column(sa.Column("key_id", sa.LargeBinary(8), nullable=True))
    bind = op.get_bind()
    keys = sa.table(
        "device_keys",
        sa.column("vin", sa.String),
        sa.column("key_id", sa.String),
        sa.column("public_key", sa.LargeBinary),
        sa.column("created_at", sa.DateTime),
        sa.column("revoked_at", sa.DateTime),
    )
    device = sa.table("device", sa.column("vin"), sa.column("public_key"), sa.column("key_id"))
    chosen: dict[str, tuple[str, bytes]] = {}
    # Newest first, active before revoked: the first row seen per VIN is the one kept.
    rows = bind.execute(
        sa.select(keys.c.vin, keys.c.key_id, keys.c.public_key).order_by(
            keys.c.vin, keys.c.revoked_at.is_(None).desc(), keys.c.created_at.desc()
        )
    )
    for vin, key_id, public_key in rows:
        chosen.setdefault(vin, (key_id, public_key))
    for vin, (key_id, public_key) in chosen.items():
        bind.execute(
            sa.update(device).where(device.c.vin == vin).values(public_key=public_key, key_id=bytes.fromhex(key_id))
        )
    orphans = bind.execute(sa.select(sa.func.count()).select_from(device).where(device.c.public_key.is_(None)))
    if orphans.scalar_one():
        raise RuntimeError("cannot downgrade below 0002: some devices have no key at all")
    op.drop_table("device_keys")
    with op.batch_alter_table("device") as batch:
        batch.alter_column("public_key", existing_type=sa.LargeBinary(32), nullable=False)
        batch.alter_column("key_id", existing_type=sa.LargeBinary(8), nullable=False)
