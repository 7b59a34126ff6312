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
import struct
from collections.abc import Sequence
from typing import NamedTuple

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: its upgrade reads rows (to walk every domain's frames): offline SQL cannot express it
data_migration = True


def would_lose(conn: sa.Connection) -> list[str]:
    """Lossless: the mapping ledger is the walk of the frames that stay, preservation.domain_id and
    level come from preserved_by and the page rows, and the views hold no data; the upgrade
    computes all of them again."""
    return []


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
    conn = op.get_bind()
    domains = conn.execute(
        sa.text(
            "SELECT id, machine_id, format, top_phys, top_level, max_vasz_lg2, features FROM domain "
            "WHERE state != 'freed' AND top_phys IS NOT NULL"
        )
    ).all()
    for did, machine_id, fmt_name, top_phys, top_level, max_vasz, features in domains:
        try:
            feats = frozenset(json.loads(features) if isinstance(features, str) else features)
            frames = {
                int(pfn) << 12: bytes(contents)
                for pfn, contents in conn.execute(
                    sa.text("SELECT pfn, contents FROM page WHERE machine_id = :m AND domain_id = :d"),
                    {"m": machine_id, "d": did},
                )
            }
            runs = frozen_runs(fmt_name, frames, top_phys, top_level, max_vasz, feats)
        except (ValueError, TypeError, LookupError, struct.error):
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
                    "l": _s64(r.iova + r.size - 1),
                    "p": r.phys,
                    "s": r.size,
                    "ps": r.page_size,
                    "r": r.readable,
                    "w": r.writable,
                    "f": json.dumps(list(r.flags)),
                },
            )


# -- frozen transforms ---------------------------------------------------------------------
# A copy of what the walk above needed from the package at this revision: the four formats'
# entry decoders and leaf bits (iommupt_store.formats), the hardware walker's leaf walk
# (pagetable.walker), range_vasz (pagetable.engine) and the run building (mappings). A
# revision never imports the live package: the package may change, this revision must keep
# filling mapping_run the way a 0006 database expects (tests/test_migrations_frozen.py
# compares it with the live walk).
_U64 = (1 << 64) - 1
_SIGN = 1 << 63
_ITEMS = struct.Struct("<512Q")
_NAPOT_64K_LG2 = 16


class FrozenRun(NamedTuple):
    iova: int
    phys: int
    size: int
    page_size: int
    readable: bool
    writable: bool
    flags: tuple[str, ...]


class _Format(NamedTuple):
    max_top_level: int
    #: the highest level that can hold a leaf
    leaf_top: int
    supported: frozenset[str]
    forced: frozenset[str]
    #: (bit, name) of the leaf bits reported as flags
    flags: tuple[tuple[int, str], ...]


_FORMATS = {
    "x86_64": _Format(
        4,
        2,
        frozenset({"SIGN_EXTEND", "FLUSH_RANGE", "FLUSH_RANGE_NO_GAPS", "X86_64_AMD_ENCRYPT_TABLES", "DMA_INCOHERENT"}),
        frozenset(),
        ((1 << 1, "rw"), (1 << 2, "user"), (1 << 5, "accessed"), (1 << 6, "dirty"), (1 << 63, "xd")),
    ),
    "vtdss": _Format(
        4,
        2,
        frozenset({"FLUSH_RANGE", "VTDSS_FORCE_COHERENCE", "VTDSS_FORCE_WRITEABLE", "DMA_INCOHERENT"}),
        frozenset(),
        ((1 << 0, "r"), (1 << 1, "w"), (1 << 8, "accessed"), (1 << 9, "dirty"), (1 << 11, "snoop")),
    ),
    "amdv1": _Format(
        5,
        4,
        frozenset(
            {
                "FULL_VA",
                "DYNAMIC_TOP",
                "FLUSH_RANGE",
                "FLUSH_RANGE_NO_GAPS",
                "AMDV1_ENCRYPT_TABLES",
                "AMDV1_FORCE_COHERENCE",
            }
        ),
        frozenset({"DYNAMIC_TOP", "AMDV1_ENCRYPT_TABLES", "AMDV1_FORCE_COHERENCE"}),
        ((1 << 61, "ir"), (1 << 62, "iw"), (1 << 6, "dirty"), (1 << 60, "force_coherent")),
    ),
    "riscv": _Format(
        4,
        4,
        frozenset({"SIGN_EXTEND", "FLUSH_RANGE", "RISCV_SVNAPOT_64K", "RISCV_SVPBMT"}),
        frozenset(),
        (
            (1 << 1, "r"),
            (1 << 2, "w"),
            (1 << 3, "x"),
            (1 << 4, "user"),
            (1 << 5, "global"),
            (1 << 6, "accessed"),
            (1 << 7, "dirty"),
            (1 << 61, "pbmt_nc"),
            (1 << 62, "pbmt_io"),
            (1 << 63, "napot"),
        ),
    ),
}

#: every feature name this revision knew (an unknown one made the domain undecodable)
_FEATURES = frozenset(
    {
        "DMA_INCOHERENT",
        "FULL_VA",
        "DYNAMIC_TOP",
        "SIGN_EXTEND",
        "FLUSH_RANGE",
        "FLUSH_RANGE_NO_GAPS",
        "AMDV1_ENCRYPT_TABLES",
        "AMDV1_FORCE_COHERENCE",
        "VTDSS_FORCE_COHERENCE",
        "VTDSS_FORCE_WRITEABLE",
        "X86_64_AMD_ENCRYPT_TABLES",
        "RISCV_SVNAPOT_64K",
        "RISCV_SVPBMT",
    }
)
_EMPTY, _TABLE, _OA = 0, 1, 2
_ADDR_51_12 = ((1 << 52) - 1) & ~0xFFF


def _decode(fmt: str, raw: int, level: int) -> tuple[int, int, int]:
    """(type, address, log2 of the items in the entry) of one item, as each format decoded it."""
    if fmt in ("x86_64", "vtdss"):
        if (fmt == "x86_64" and not raw & 1) or raw == 0:
            return _EMPTY, 0, 0
        if level == 0 or (level <= 2 and raw & (1 << 7)):
            return _OA, raw & _ADDR_51_12, 0
        return _TABLE, raw & _ADDR_51_12, 0
    if fmt == "amdv1":
        if not raw & 1:
            return _EMPTY, 0, 0
        field = (raw >> 12) & ((1 << 40) - 1)
        nl = (raw >> 9) & 7
        if level != 0 and nl not in (0, 7):
            return _TABLE, field << 12, 0
        if nl == 0:
            return _OA, field << 12, 0
        if nl == 7:
            ones = ((field ^ (field + 1)).bit_length()) - 1
            return _OA, (field & ~((1 << ones) - 1)) << 12, max(0, ones + 13 - (12 + 9 * level))
        return _OA, 0, 0
    if fmt == "riscv":
        if not raw & 1:
            return _EMPTY, 0, 0
        if level != 0 and not raw & 0b1110:
            return _TABLE, ((raw >> 10) & ((1 << 44) - 1)) << 12, 0
        if level == 0 and raw & (1 << 63):
            return _OA, ((raw >> 14) & ((1 << 40) - 1)) << _NAPOT_64K_LG2, _NAPOT_64K_LG2 - 12
        return _OA, ((raw >> 10) & ((1 << 44) - 1)) << 12, 0
    raise LookupError(fmt)


def _effective(fmt: _Format, feature: str, features: frozenset[str]) -> bool:
    return feature in fmt.forced or (feature in features and feature in fmt.supported)


def _permissions(fmt: str, raw: int) -> tuple[bool, bool]:
    if fmt == "x86_64":
        return True, bool(raw & (1 << 1))
    if fmt == "vtdss":
        return bool(raw & 1), bool(raw & 2)
    if fmt == "amdv1":
        return bool(raw & (1 << 61)), bool(raw & (1 << 62))
    return bool(raw & 2), bool(raw & 4)


def frozen_runs(
    fmt_name: str, frames: dict[int, bytes], top_phys: int, top_level: int, max_vasz: int, features: frozenset[str]
) -> list[FrozenRun]:
    """The maximal runs of one domain's leaves, as this revision computed them."""
    fmt = _FORMATS[fmt_name]
    if features - _FEATURES:
        raise ValueError(f"unknown features {sorted(features - _FEATURES)}")
    if _effective(fmt, "DYNAMIC_TOP", features) and top_level != fmt.max_top_level:
        vasz = min(max_vasz, 9 + 12 + 9 * top_level)
    else:
        vasz = max_vasz
    sign_extend = _effective(fmt, "SIGN_EXTEND", features)
    seen: set[int] = set()
    leaves: list[tuple[int, int, int, int]] = []

    def top_base(index: int) -> int:
        va = index << (12 + 9 * top_level)
        if sign_extend and vasz < 64 and (va >> (vasz - 1)) & 1:
            va |= _U64 ^ ((1 << vasz) - 1)
        return va

    def visit(phys: int, level: int, base: int, n: int, top: bool) -> None:
        if phys in seen:
            raise ValueError(f"table {phys:#x} is reachable twice")
        seen.add(phys)
        data = frames[phys]
        if len(data) != 4096:
            raise ValueError(f"frame {phys:#x} is {len(data)} bytes")
        items = _ITEMS.unpack(data)
        item = 12 + 9 * level
        i = 0
        while i < n:
            raw = items[i]
            if not raw:
                i += 1
                continue
            kind, addr, contig = _decode(fmt_name, raw, level)
            if kind == _OA:
                va = top_base(i) if top else base + (i << item)
                step, size = 1 << contig, 1 << (item + contig)
                leaves.append((va & ~(size - 1), addr, size, raw))
                i = (i & ~(step - 1)) + step
                continue
            if kind == _TABLE:
                if level == 0:
                    raise ValueError(f"level-0 table {phys:#x} holds a table pointer")
                va = top_base(i) if top else base + (i << item)
                visit(addr, level - 1, va, 512, False)
            i += 1

    visit(top_phys, top_level, 0, min(1 << (vasz - (12 + 9 * top_level)), 512), True)
    runs: list[FrozenRun] = []
    for iova, phys, size, raw in sorted(leaves):
        readable, writable = _permissions(fmt_name, raw)
        flags = tuple(name for bit, name in fmt.flags if raw & bit)
        parts = [FrozenRun(iova, phys, size, size, readable, writable, flags)]
        if iova < _SIGN <= iova + size - 1:  # a run never crosses 2^63
            cut = _SIGN - iova
            parts = [parts[0]._replace(size=cut), FrozenRun(_SIGN, phys + cut, size - cut, size, *parts[0][4:])]
        for part in parts:
            last = runs[-1] if runs else None
            if (
                last is not None
                and part.iova == last.iova + last.size
                and part.phys == last.phys + last.size
                and part[3:] == last[3:]
                and part.iova != _SIGN
            ):
                runs[-1] = last._replace(size=last.size + part.size)
            else:
                runs.append(part)
    return runs


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
