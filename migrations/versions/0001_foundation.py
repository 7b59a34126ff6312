"""foundation: machines, boots, pages

Revision ID: 0001
Revises:
Create Date: 2026-11-24 15:19:02.716861
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _count(conn: sa.Connection, table: str, *where: sa.ColumnElement[bool]) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(sa.table(table)).where(*where)).scalar_one())


def would_lose(conn: sa.Connection) -> list[str]:
    """Reverting this revision drops every table: every machine, its boots and frames."""
    machines = _count(conn, "machine")
    if not machines:
        return []
    return [f"{machines} machine(s) with {_count(conn, 'boot')} boot(s) and {_count(conn, 'page')} page(s)"]


def upgrade() -> None:
    op.create_table(
        "machine",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("mem_bytes", sa.BigInteger(), nullable=False),
        sa.Column("page_size", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("mem_bytes > 0", name=op.f("ck_machine_mem_positive")),
        sa.CheckConstraint("page_size = 4096", name=op.f("ck_machine_page_size_4k")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_machine")),
        sa.UniqueConstraint("name", name=op.f("uq_machine_name")),
    )
    op.create_table(
        "boot",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("machine_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_kind", sa.String(length=16), nullable=True),
        sa.CheckConstraint(
            "end_kind IS NULL OR end_kind IN ('cold', 'liveupdate')", name=op.f("ck_boot_end_kind_known")
        ),
        sa.CheckConstraint("(ended_at IS NULL) = (end_kind IS NULL)", name=op.f("ck_boot_ended_consistent")),
        sa.CheckConstraint("number >= 1", name=op.f("ck_boot_number_positive")),
        sa.ForeignKeyConstraint(
            ["machine_id"], ["machine.id"], name=op.f("fk_boot_machine_id_machine"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_boot")),
        sa.UniqueConstraint("machine_id", "number", name="uq_boot_machine_number"),
    )
    with op.batch_alter_table("boot", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_boot_machine_id"), ["machine_id"], unique=False)

    op.create_table(
        "page",
        sa.Column("machine_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("pfn", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("page_order", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("boot_id", sa.Integer(), nullable=False),
        sa.Column("contents", sa.LargeBinary(), nullable=False),
        sa.CheckConstraint("length(contents) = (4096 << page_order)", name=op.f("ck_page_contents_size")),
        sa.CheckConstraint("page_order >= 0 AND page_order <= 18", name=op.f("ck_page_order_range")),
        sa.ForeignKeyConstraint(["boot_id"], ["boot.id"], name=op.f("fk_page_boot_id_boot")),
        sa.ForeignKeyConstraint(
            ["machine_id"], ["machine.id"], name=op.f("fk_page_machine_id_machine"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("machine_id", "pfn", name=op.f("pk_page")),
    )
    with op.batch_alter_table("page", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_page_boot_id"), ["boot_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("page", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_page_boot_id"))

    op.drop_table("page")
    with op.batch_alter_table("boot", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_boot_machine_id"))

    op.drop_table("boot")
    op.drop_table("machine")
