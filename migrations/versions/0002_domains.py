"""page-table domains and frames

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 15:25:33.471338
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _count(conn: sa.Connection, table: str, *where: sa.ColumnElement[bool]) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(sa.table(table)).where(*where)).scalar_one())


def would_lose(conn: sa.Connection) -> list[str]:
    """The domains table goes; their frames would stay as plain pages with no owner domain."""
    n = _count(conn, "domain")
    return [f"{n} domain(s) (their frames would stay as pages that belong to no domain)"] if n else []


def upgrade() -> None:
    op.create_table(
        "domain",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("machine_id", sa.Integer(), nullable=False),
        sa.Column("boot_id", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("top_phys", sa.BigInteger(), nullable=True),
        sa.Column("top_level", sa.Integer(), nullable=False),
        sa.Column("max_vasz_lg2", sa.Integer(), nullable=False),
        sa.Column("max_oasz_lg2", sa.Integer(), nullable=False),
        sa.Column("features", sa.JSON(), nullable=False),
        sa.Column("pgsize_bitmap", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("(state = 'freed') = (top_phys IS NULL)", name=op.f("ck_domain_top_unless_freed")),
        sa.CheckConstraint("state IN ('live', 'preserved', 'restored', 'freed')", name=op.f("ck_domain_state_known")),
        sa.CheckConstraint("max_vasz_lg2 > 0 AND max_vasz_lg2 <= 64", name=op.f("ck_domain_vasz_range")),
        sa.CheckConstraint("top_level >= 0 AND top_level <= 5", name=op.f("ck_domain_top_level_range")),
        sa.ForeignKeyConstraint(["boot_id"], ["boot.id"], name=op.f("fk_domain_boot_id_boot")),
        sa.ForeignKeyConstraint(
            ["machine_id"], ["machine.id"], name=op.f("fk_domain_machine_id_machine"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_domain")),
    )
    with op.batch_alter_table("domain", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_domain_boot_id"), ["boot_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_domain_machine_id"), ["machine_id"], unique=False)

    with op.batch_alter_table("page", schema=None) as batch_op:
        batch_op.add_column(sa.Column("domain_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("level", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_page_domain_id"), ["domain_id"], unique=False)
        batch_op.create_foreign_key(batch_op.f("fk_page_domain_id_domain"), "domain", ["domain_id"], ["id"])
        batch_op.create_check_constraint(op.f("ck_page_frame_has_level"), "(domain_id IS NULL) = (level IS NULL)")


def downgrade() -> None:
    with op.batch_alter_table("page", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("ck_page_frame_has_level"), type_="check")
        batch_op.drop_constraint(batch_op.f("fk_page_domain_id_domain"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_page_domain_id"))
        batch_op.drop_column("level")
        batch_op.drop_column("domain_id")

    with op.batch_alter_table("domain", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_domain_machine_id"))
        batch_op.drop_index(batch_op.f("ix_domain_boot_id"))

    op.drop_table("domain")
