"""live update: preservations, handover entries, incoherent flag

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 15:29:20.295741
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _count(conn: sa.Connection, table: str, *where: sa.ColumnElement[bool]) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(sa.table(table)).where(*where)).scalar_one())


def would_lose(conn: sa.Connection) -> list[str]:
    """Preservation records, handover entries and the incoherent-frame marks go."""
    out = []
    if n := _count(conn, "handover_entry"):
        out.append(f"{n} handover entr{'y' if n == 1 else 'ies'}")
    if n := _count(conn, "preservation"):
        out.append(f"{n} preservation record(s) (preserved frames)")
    if n := _count(conn, "page", sa.column("incoherent") == sa.true()):
        out.append(f"the incoherent mark of {n} page(s)")
    return out


def upgrade() -> None:
    op.create_table(
        "preservation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("machine_id", sa.Integer(), nullable=False),
        sa.Column("pfn", sa.BigInteger(), nullable=False),
        sa.Column("page_order", sa.Integer(), nullable=False),
        sa.Column("boot_id", sa.Integer(), nullable=False),
        sa.Column("preserved_by", sa.String(length=64), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("restored_boot_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("page_order >= 0 AND page_order <= 18", name=op.f("ck_preservation_order_range")),
        sa.CheckConstraint(
            "restored_boot_id IS NULL OR restored_boot_id != boot_id", name=op.f("ck_preservation_restored_later")
        ),
        sa.ForeignKeyConstraint(["boot_id"], ["boot.id"], name=op.f("fk_preservation_boot_id_boot")),
        sa.ForeignKeyConstraint(
            ["machine_id"], ["machine.id"], name=op.f("fk_preservation_machine_id_machine"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["restored_boot_id"], ["boot.id"], name=op.f("fk_preservation_restored_boot_id_boot")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_preservation")),
        sa.UniqueConstraint("machine_id", "boot_id", "pfn", name="uq_preservation_boot_pfn"),
    )
    with op.batch_alter_table("preservation", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_preservation_boot_id"), ["boot_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_preservation_machine_id"), ["machine_id"], unique=False)

    op.create_table(
        "handover_entry",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("machine_id", sa.Integer(), nullable=False),
        sa.Column("boot_id", sa.Integer(), nullable=False),
        sa.Column("token", sa.BigInteger(), nullable=False),
        sa.Column("compatible", sa.String(length=64), nullable=False),
        sa.Column("descriptor", sa.JSON(), nullable=False),
        sa.Column("domain_id", sa.Integer(), nullable=True),
        sa.Column("restored_boot_id", sa.Integer(), nullable=True),
        sa.Column("restored_domain_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["boot_id"], ["boot.id"], name=op.f("fk_handover_entry_boot_id_boot")),
        sa.ForeignKeyConstraint(["domain_id"], ["domain.id"], name=op.f("fk_handover_entry_domain_id_domain")),
        sa.ForeignKeyConstraint(
            ["machine_id"], ["machine.id"], name=op.f("fk_handover_entry_machine_id_machine"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["restored_boot_id"], ["boot.id"], name=op.f("fk_handover_entry_restored_boot_id_boot")
        ),
        sa.ForeignKeyConstraint(
            ["restored_domain_id"], ["domain.id"], name=op.f("fk_handover_entry_restored_domain_id_domain")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_handover_entry")),
        sa.UniqueConstraint("boot_id", "token", name="uq_handover_entry_boot_token"),
    )
    with op.batch_alter_table("handover_entry", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_handover_entry_boot_id"), ["boot_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_handover_entry_machine_id"), ["machine_id"], unique=False)

    with op.batch_alter_table("page", schema=None) as batch_op:
        batch_op.add_column(sa.Column("incoherent", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("page", schema=None) as batch_op:
        batch_op.drop_column("incoherent")

    with op.batch_alter_table("handover_entry", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_handover_entry_machine_id"))
        batch_op.drop_index(batch_op.f("ix_handover_entry_boot_id"))

    op.drop_table("handover_entry")
    with op.batch_alter_table("preservation", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_preservation_machine_id"))
        batch_op.drop_index(batch_op.f("ix_preservation_boot_id"))

    op.drop_table("preservation")
