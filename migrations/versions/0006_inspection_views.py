"""inspection: the mapping ledger, preservation.domain_id/level, and the SQL views

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 21:00:00.000000

Adds ``mapping_run`` (maximal runs of leaves per domain, filled here for the
domains already stored by walking their frames), gives ``preservation`` a
real ``domain_id`` and ``level`` (filled from ``preserved_by`` and the page
rows), and creates the views ``mapping``, ``table_frame``,
``preserved_frame`` and ``leaked_frame`` for SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VIEWS = ("leaked_frame", "preserved_frame", "table_frame", "mapping")


def upgrade() -> None:
    op.create_table(
        "mapping_run",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("domain_id", sa.Integer(), nullable=False),
        sa.Column("iova", sa.BigInteger(), nullable=False),
        sa.Column("last_iova", sa.BigInteger(), nullable=False),
        sa.Column("phys", sa.BigInteger(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("page_size", sa.BigInteger(), nullable=False),
        sa.Column("readable", sa.Boolean(), nullable=False),
        sa.Column("writable", sa.Boolean(), nullable=False),
        sa.Column("flags", sa.String(length=400), nullable=False),
        sa.CheckConstraint("size > 0 AND page_size > 0", name=op.f("ck_mapping_run_sizes_positive")),
        sa.ForeignKeyConstraint(
            ["domain_id"], ["domain.id"], name=op.f("fk_mapping_run_domain_id_domain"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mapping_run")),
    )
    op.create_index("ix_mapping_run_domain_iova", "mapping_run", ["domain_id", "iova"])
    op.create_index("ix_mapping_run_domain_last", "mapping_run", ["domain_id", "last_iova"])
    with op.batch_alter_table("preservation") as batch:
        batch.add_column(sa.Column("domain_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("level", sa.Integer(), nullable=True))
        batch.create_foreign_key(op.f("fk_preservation_domain_id_domain"), "domain", ["domain_id"], ["id"])
        batch.create_index(op.f("ix_preservation_domain_id"), ["domain_id"])
    _fill_preservation_domains()
    _fill_mapping_runs()
    for sql in _view_sql(op.get_bind().dialect.name):
        op.execute(sql)


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
    with op.batch_alter_table("preservation") as batch:
        batch.drop_index(op.f("ix_preservation_domain_id"))
        batch.drop_constraint(op.f("fk_preservation_domain_id_domain"), type_="foreignkey")
        batch.drop_column("level")
        batch.drop_column("domain_id")
    op.drop_index("ix_mapping_run_domain_last", table_name="mapping_run")
    op.drop_index("ix_mapping_run_domain_iova", table_name="mapping_run")
    op.drop_table("mapping_run")


# -- data ----------------------------------------------------------------------------------
def _fill_preservation_domains() -> None:
    """One statement: the domain from ``preserved_by`` ('iommupt:domain/N'), the level from the page row."""
    op.execute(
        """
UPDATE preservation
SET domain_id = CAST(substr(preserved_by, 16) AS INTEGER),
    level = (SELECT p.level FROM page p WHERE p.machine_id = preservation.machine_id AND p.pfn = preservation.pfn)
WHERE preserved_by LIKE 'iommupt:domain/%'
"""
    )


def _fill_mapping_runs() -> None:
    """Walk every stored domain's frames once; the walk and decoders are pure functions of the bytes."""
    from iommupt_store.formats import get_format
    from iommupt_store.formats.base import Feature
    from iommupt_store.mappings import walker_runs
    from iommupt_store.pagetable.engine import range_vasz
    from iommupt_store.pagetable.walker import HardwareWalker, WalkError

    conn = op.get_bind()
    domains = conn.execute(
        sa.text(
            "SELECT id, machine_id, format, top_phys, top_level, max_vasz_lg2, features FROM domain "
            "WHERE state != 'freed' AND top_phys IS NOT NULL"
        )
    ).all()
    for did, machine_id, fmt_name, top_phys, top_level, max_vasz, features in domains:
        try:
            fmt = get_format(fmt_name)
            feats = frozenset(Feature(f) for f in (json.loads(features) if isinstance(features, str) else features))
            frames = {
                int(pfn) << 12: bytes(contents)
                for pfn, contents in conn.execute(
                    sa.text("SELECT pfn, contents FROM page WHERE machine_id = :m AND domain_id = :d"),
                    {"m": machine_id, "d": did},
                )
            }
            walker = HardwareWalker(
                fmt,
                frames,
                top_phys=top_phys,
                top_level=top_level,
                vasz=range_vasz(fmt, top_level, max_vasz, feats),
                sign_extend=fmt.effective(Feature.SIGN_EXTEND, feats),
            )
            runs = walker_runs(walker)
        except (WalkError, ValueError, TypeError, LookupError):
            continue  # damaged domains are fsck's to report, not the upgrade's to refuse
        for r in runs:
            conn.execute(
                sa.text(
                    "INSERT INTO mapping_run (domain_id, iova, last_iova, phys, size, page_size, readable, "
                    "writable, flags) VALUES (:d, :i, :l, :p, :s, :ps, :r, :w, :f)"
                ),
                {
                    "d": did,
                    "i": _s64(r.iova),
                    "l": _s64(r.last),
                    "p": r.phys,
                    "s": r.size,
                    "ps": r.page_size,
                    "r": r.readable,
                    "w": r.writable,
                    "f": json.dumps(list(r.flags)),
                },
            )


def _s64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


# -- views ---------------------------------------------------------------------------------
def _view_sql(dialect: str) -> list[str]:
    if dialect == "postgresql":
        used = (
            "(SELECT count(*) FROM generate_series(0, 511) AS slot(n) "
            "WHERE substring(p.contents FROM slot.n * 8 + 1 FOR 8) <> '\\x0000000000000000'::bytea)"
        )
    else:
        used = (
            "(WITH RECURSIVE slot(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM slot WHERE n < 511) "
            "SELECT count(*) FROM slot WHERE substr(p.contents, slot.n * 8 + 1, 8) != zeroblob(8))"
        )
    return [
        """
CREATE VIEW mapping AS
SELECT m.name AS machine, r.domain_id AS domain_id, r.iova AS iova, r.phys AS phys, r.size AS size,
       r.page_size AS page_size, r.readable AS readable, r.writable AS writable, r.flags AS attrs,
       d.format AS format, r.last_iova AS last_iova
FROM mapping_run r
JOIN domain d ON d.id = r.domain_id
JOIN machine m ON m.id = d.machine_id
WHERE d.state != 'freed'
""",
        f"""
CREATE VIEW table_frame AS
SELECT m.name AS machine, p.domain_id AS domain_id, p.level AS level, p.pfn AS pfn, p.pfn * 4096 AS phys,
       {used} AS entries_used,
       EXISTS (SELECT 1 FROM preservation pr
               WHERE pr.machine_id = p.machine_id AND pr.pfn = p.pfn AND pr.domain_id = p.domain_id
                 AND pr.restored_boot_id IS NULL) AS preserved
FROM page p
JOIN machine m ON m.id = p.machine_id
WHERE p.domain_id IS NOT NULL
""",
        """
CREATE VIEW preserved_frame AS
SELECT m.name AS machine, b.number AS boot, pr.pfn AS pfn, pr.pfn * 4096 AS phys, pr.page_order AS page_order,
       pr.domain_id AS domain_id, s.name AS session, h.token AS token, pr.level AS level,
       pr.content_hash AS content_hash, rb.number AS restored_in_boot
FROM preservation pr
JOIN machine m ON m.id = pr.machine_id
JOIN boot b ON b.id = pr.boot_id
LEFT JOIN handover_entry h ON h.boot_id = pr.boot_id AND h.domain_id = pr.domain_id AND h.kind = 'domain'
LEFT JOIN luo_session s ON s.id = h.session_id
LEFT JOIN boot rb ON rb.id = pr.restored_boot_id
""",
        """
CREATE VIEW leaked_frame AS
SELECT m.name AS machine, b.number AS boot, pr.pfn AS pfn, pr.pfn * 4096 AS phys, pr.page_order AS page_order,
       pr.domain_id AS domain_id, s.name AS session, h.token AS token, pr.level AS level,
       pr.content_hash AS content_hash, NULL AS restored_in_boot
FROM preservation pr
JOIN machine m ON m.id = pr.machine_id
JOIN boot b ON b.id = pr.boot_id AND b.end_kind = 'liveupdate'
JOIN boot nb ON nb.machine_id = b.machine_id AND nb.number = b.number + 1
LEFT JOIN handover_entry h ON h.boot_id = pr.boot_id AND h.domain_id = pr.domain_id AND h.kind = 'domain'
LEFT JOIN luo_session s ON s.id = h.session_id
WHERE pr.restored_boot_id IS NULL
  AND (nb.end_kind IS NOT NULL OR s.state IN ('finished', 'discarded'))
""",
    ]
