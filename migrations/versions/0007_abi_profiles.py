"""abi profiles: kernel profiles on boots, versioned handover entries, and the KHO/LUO handover records

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 00:00:00.000000

Adds ``boot.kernel_profile`` (every boot stored before this revision ran
``lu-v3``, whose descriptors are catalogue version 1) and
``boot.handover_discarded``; ``handover_entry.abi_version`` (1 for every stored
entry) and ``flags`` (0); and the tables of the handover records: ``kho_root``
(with kexec-metadata and the LUO header), ``kho_subnode``, ``luo_file`` and
``luo_flb``.

No stored digest changes: the digests leave out a field whose value is the one
every row had before this revision (profile lu-v3, version 1, flags 0, no KHO
root), so handovers sealed before it verify after it. Downgrade drops the
version-2 and DELETED entries and the handover records; ``would_lose`` lists them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# the tables as this revision knows them (the models may move on)
boot = sa.table("boot", sa.column("id", sa.Integer), sa.column("kernel_profile", sa.String))
entry = sa.table(
    "handover_entry",
    sa.column("id", sa.Integer),
    sa.column("abi_version", sa.Integer),
    sa.column("flags", sa.Integer),
    sa.column("boot_id", sa.Integer),
)
RECORD_TABLES = ("luo_flb", "luo_file", "kho_subnode", "kho_root")


def _common(name: str) -> list[sa.SchemaItem]:
    return [
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("machine_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["machine_id"], ["machine.id"], name=op.f(f"fk_{name}_machine_id_machine"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["boot_id"], ["boot.id"], name=op.f(f"fk_{name}_boot_id_boot")),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{name}")),
    ]


def upgrade() -> None:
    op.add_column("boot", sa.Column("kernel_profile", sa.String(length=32), server_default="lu-v3", nullable=False))
    op.add_column("boot", sa.Column("handover_discarded", sa.String(length=200), nullable=True))
    op.add_column("handover_entry", sa.Column("abi_version", sa.Integer(), server_default="1", nullable=False))
    op.add_column("handover_entry", sa.Column("flags", sa.Integer(), server_default="0", nullable=False))
    if op.get_bind().dialect.name != "sqlite":  # SQLite adds no constraint to an existing table
        op.create_check_constraint(op.f("ck_handover_entry_abi_version_positive"), "handover_entry", "abi_version >= 1")
        op.create_check_constraint(op.f("ck_handover_entry_flags_known"), "handover_entry", "flags >= 0 AND flags <= 3")
    op.create_table(
        "kho_root",
        *_common("kho_root"),
        sa.Column("boot_id", sa.Integer(), nullable=False),
        sa.Column("compatible", sa.String(length=48), nullable=False),
        sa.Column("preserved_memory_map", sa.BigInteger(), nullable=True),
        sa.Column("writer_profile", sa.String(length=32), nullable=True),
        sa.Column("kexec_version", sa.BigInteger(), nullable=True),
        sa.Column("previous_release", sa.String(length=65), nullable=True),
        sa.Column("kexec_count", sa.BigInteger(), nullable=True),
        sa.Column("luo_compatible", sa.String(length=48), nullable=True),
        sa.Column("liveupdate_num", sa.BigInteger(), nullable=True),
        sa.CheckConstraint(
            "(kexec_version IS NULL) = (kexec_count IS NULL)", name=op.f("ck_kho_root_kexec_metadata_whole")
        ),
        sa.CheckConstraint(
            "(luo_compatible IS NULL) = (liveupdate_num IS NULL)", name=op.f("ck_kho_root_luo_header_whole")
        ),
        sa.UniqueConstraint("boot_id", name=op.f("uq_kho_root_boot_id")),
    )
    op.create_table(
        "kho_subnode",
        *_common("kho_subnode"),
        sa.Column("boot_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("preserved_data", sa.BigInteger(), nullable=False),
        sa.Column("blob_size", sa.BigInteger(), nullable=True),
        sa.Column("compatible", sa.String(length=48), nullable=True),
        sa.UniqueConstraint("boot_id", "name", name="uq_kho_subnode_boot_name"),
    )
    op.create_table(
        "luo_file",
        *_common("luo_file"),
        sa.Column("boot_id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("compatible", sa.String(length=48), nullable=False),
        sa.Column("data", sa.BigInteger(), nullable=False),
        sa.Column("token", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["luo_session.id"], name=op.f("fk_luo_file_session_id_luo_session")),
        sa.UniqueConstraint("session_id", "token", name="uq_luo_file_session_token"),
    )
    op.create_table(
        "luo_flb",
        *_common("luo_flb"),
        sa.Column("boot_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=48), nullable=False),
        sa.Column("data", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("boot_id", "name", name="uq_luo_flb_boot_name"),
    )
    for name in RECORD_TABLES:
        op.create_index(op.f(f"ix_{name}_machine_id"), name, ["machine_id"])
        if name != "kho_root":
            op.create_index(op.f(f"ix_{name}_boot_id"), name, ["boot_id"])
    op.create_index(op.f("ix_luo_file_session_id"), "luo_file", ["session_id"])


def would_lose(conn: sa.Connection) -> list[str]:
    """One line per kind of data the downgrade would drop (empty: nothing)."""
    insp = sa.inspect(conn)
    if "kho_root" not in insp.get_table_names():
        return []
    out = []
    v2 = conn.execute(sa.select(sa.func.count()).select_from(entry).where(entry.c.abi_version != 1)).scalar_one()
    if v2:
        out.append(f"{v2} handover entr{'y' if v2 == 1 else 'ies'} with descriptors of a version other than 1")
    deleted = conn.execute(
        sa.select(sa.func.count()).select_from(entry).where(entry.c.abi_version == 1, entry.c.flags != 0)
    ).scalar_one()
    if deleted:
        out.append(f"{deleted} handover entr{'y' if deleted == 1 else 'ies'} with flags set (DELETED slots)")
    # a profile matters where a handover was written under it; a boot that preserved nothing loses nothing
    profiled = conn.execute(
        sa.select(sa.func.count())
        .select_from(boot)
        .where(boot.c.kernel_profile != "lu-v3", sa.exists().where(entry.c.boot_id == boot.c.id))
    ).scalar_one()
    if profiled:
        out.append(f"the kernel profile of {profiled} boot(s) that wrote a handover not as lu-v3")
    for name, what in (
        ("kho_root", "KHO root(s) with kexec metadata and LUO header"),
        ("kho_subnode", "KHO subnode(s)"),
        ("luo_file", "LUO file(s)"),
        ("luo_flb", "LUO FLB(s)"),
    ):
        n = conn.execute(sa.text(f"SELECT count(*) FROM {name}")).scalar_one()
        if n:
            out.append(f"{n} {what}")
    return out


def downgrade() -> None:
    op.execute(sa.delete(entry).where(sa.or_(entry.c.abi_version != 1, entry.c.flags != 0)))
    op.drop_index(op.f("ix_luo_file_session_id"), table_name="luo_file")
    for name in RECORD_TABLES:
        if name != "kho_root":
            op.drop_index(op.f(f"ix_{name}_boot_id"), table_name=name)
        op.drop_index(op.f(f"ix_{name}_machine_id"), table_name=name)
        op.drop_table(name)
    if op.get_bind().dialect.name != "sqlite":
        op.drop_constraint(op.f("ck_handover_entry_flags_known"), "handover_entry", type_="check")
        op.drop_constraint(op.f("ck_handover_entry_abi_version_positive"), "handover_entry", type_="check")
    op.drop_column("handover_entry", "flags")
    op.drop_column("handover_entry", "abi_version")
    op.drop_column("boot", "handover_discarded")
    op.drop_column("boot", "kernel_profile")
