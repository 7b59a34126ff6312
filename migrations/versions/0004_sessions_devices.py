"""sessions and devices

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 15:57:51.093387
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _count(conn: sa.Connection, table: str, *where: sa.ColumnElement[bool]) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(sa.table(table)).where(*where)).scalar_one())


def would_lose(conn: sa.Connection) -> list[str]:
    """Sessions and devices go; handover entries lose their kind and session."""
    out = []
    if n := _count(conn, "luo_session"):
        out.append(f"{n} LUO session(s) (their handover entries lose their session)")
    if n := _count(conn, "device"):
        out.append(f"{n} device(s) (their attachments and owners)")
    if n := _count(conn, "handover_entry", sa.column("kind") == "device"):
        entries = f"{n} device handover entr{'y' if n == 1 else 'ies'}"
        out.append(f"{entries} (an older store would read them as domain entries)")
    return out


def upgrade() -> None:
    op.create_table(
        "luo_session",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("machine_id", sa.Integer(), nullable=False),
        sa.Column("boot_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("retrieved_boot_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('open', 'sealed', 'retrieved', 'finished', 'discarded')", name=op.f("ck_luo_session_state_known")
        ),
        sa.ForeignKeyConstraint(["boot_id"], ["boot.id"], name=op.f("fk_luo_session_boot_id_boot")),
        sa.ForeignKeyConstraint(
            ["machine_id"], ["machine.id"], name=op.f("fk_luo_session_machine_id_machine"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["retrieved_boot_id"], ["boot.id"], name=op.f("fk_luo_session_retrieved_boot_id_boot")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_luo_session")),
        sa.UniqueConstraint("boot_id", "name", name="uq_luo_session_boot_name"),
    )
    with op.batch_alter_table("luo_session", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_luo_session_boot_id"), ["boot_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_luo_session_machine_id"), ["machine_id"], unique=False)

    op.create_table(
        "device",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("machine_id", sa.Integer(), nullable=False),
        sa.Column("bdf", sa.String(length=12), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=True),
        sa.Column("domain_id", sa.Integer(), nullable=True),
        sa.Column("did", sa.Integer(), nullable=True),
        sa.Column("boot_id", sa.Integer(), nullable=True),
        sa.CheckConstraint("(domain_id IS NULL) = (did IS NULL)", name=op.f("ck_device_attached_has_did")),
        sa.CheckConstraint("did IS NULL OR (did >= 1 AND did <= 65535)", name=op.f("ck_device_did_range")),
        sa.ForeignKeyConstraint(["boot_id"], ["boot.id"], name=op.f("fk_device_boot_id_boot")),
        sa.ForeignKeyConstraint(["domain_id"], ["domain.id"], name=op.f("fk_device_domain_id_domain")),
        sa.ForeignKeyConstraint(
            ["machine_id"], ["machine.id"], name=op.f("fk_device_machine_id_machine"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device")),
        sa.UniqueConstraint("machine_id", "bdf", name="uq_device_machine_bdf"),
    )
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_device_machine_id"), ["machine_id"], unique=False)

    with op.batch_alter_table("handover_entry", schema=None) as batch_op:
        batch_op.add_column(sa.Column("session_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("kind", sa.String(length=16), server_default="domain", nullable=False))
        batch_op.add_column(sa.Column("device_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_handover_entry_session_id"), ["session_id"], unique=False)
        batch_op.create_foreign_key(batch_op.f("fk_handover_entry_device_id_device"), "device", ["device_id"], ["id"])
        batch_op.create_foreign_key(
            batch_op.f("fk_handover_entry_session_id_luo_session"), "luo_session", ["session_id"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("handover_entry", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_handover_entry_session_id_luo_session"), type_="foreignkey")
        batch_op.drop_constraint(batch_op.f("fk_handover_entry_device_id_device"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_handover_entry_session_id"))
        batch_op.drop_column("device_id")
        batch_op.drop_column("kind")
        batch_op.drop_column("session_id")

    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_machine_id"))

    op.drop_table("device")
    with op.batch_alter_table("luo_session", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_luo_session_machine_id"))
        batch_op.drop_index(batch_op.f("ix_luo_session_boot_id"))

    op.drop_table("luo_session")
