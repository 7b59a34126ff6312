"""handover digests: what a boot recorded at preserve and at the seal

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 20:40:00.000000

Adds ``handover_entry.digest`` and ``frames_digest`` and ``boot.handover_digest``
and computes them for what is already stored, so that handovers sealed before
this revision stay restorable.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: its upgrade reads rows (to compute the digests): offline SQL cannot express it
data_migration = True


def would_lose(conn: sa.Connection) -> list[str]:
    """Lossless: the digests are computed from the rows that stay, and this upgrade computes them again."""
    return []


# the tables as this revision knows them (the models may move on)
boot = sa.table(
    "boot",
    sa.column("id", sa.Integer),
    sa.column("number", sa.Integer),
    sa.column("end_kind", sa.String),
    sa.column("handover_digest", sa.String),
)
entry = sa.table(
    "handover_entry",
    sa.column("id", sa.Integer),
    sa.column("machine_id", sa.Integer),
    sa.column("boot_id", sa.Integer),
    sa.column("token", sa.BigInteger),
    sa.column("kind", sa.String),
    sa.column("compatible", sa.String),
    sa.column("descriptor", sa.JSON),
    sa.column("domain_id", sa.Integer),
    sa.column("device_id", sa.Integer),
    sa.column("session_id", sa.Integer),
    sa.column("digest", sa.String),
    sa.column("frames_digest", sa.String),
)
session = sa.table(
    "luo_session", sa.column("id", sa.Integer), sa.column("boot_id", sa.Integer), sa.column("name", sa.String)
)
preservation = sa.table(
    "preservation",
    sa.column("machine_id", sa.Integer),
    sa.column("boot_id", sa.Integer),
    sa.column("pfn", sa.BigInteger),
    sa.column("page_order", sa.Integer),
    sa.column("preserved_by", sa.String),
    sa.column("content_hash", sa.String),
)


# -- frozen transforms ---------------------------------------------------------------------
# A copy of iommupt_store.liveupdate.digests as it was at this revision (digest format 1).
# A revision never imports the live package: if the live digests change, this revision must
# still compute what a 0005 database holds (tests/test_migrations_frozen.py compares both).
_DIGEST_FORMAT = 1


def owner_tag(domain_id: int) -> str:
    return f"iommupt:domain/{domain_id}"


def _sha256(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def entry_digest(
    *,
    machine_id: int,
    boot_id: int,
    boot_number: int,
    token: int,
    kind: str,
    compatible: str,
    descriptor: Any,
    domain_id: int | None,
    device_id: int | None,
    session_id: int | None,
    session_name: str | None,
) -> str:
    return _sha256(
        {
            "format": _DIGEST_FORMAT,
            "machine_id": machine_id,
            "boot_id": boot_id,
            "boot": boot_number,
            "token": token,
            "kind": kind,
            "compatible": compatible,
            "descriptor": descriptor,
            "domain_id": domain_id,
            "device_id": device_id,
            "session_id": session_id,
            "session": session_name,
        }
    )


def frames_digest(frames: Iterable[tuple[int, int, str]]) -> str:
    return _sha256({"format": _DIGEST_FORMAT, "frames": sorted([list(f) for f in frames])})


def seal_digest(
    *,
    boot_id: int,
    boot_number: int,
    entries: Iterable[tuple[int, str | None, str | None]],
    sessions: Iterable[tuple[int, str]],
    preservations: Iterable[tuple[int, int, str, str]],
) -> str:
    return _sha256(
        {
            "format": _DIGEST_FORMAT,
            "boot_id": boot_id,
            "boot": boot_number,
            "entries": sorted([list(e) for e in entries]),
            "sessions": sorted([list(s) for s in sessions]),
            "preservations": sorted([list(p) for p in preservations]),
        }
    )


def _u64(v: int) -> int:
    return v + (1 << 64) if v < 0 else v  # stored as two's complement


def _fill(conn: sa.Connection) -> None:
    numbers = dict(conn.execute(sa.select(boot.c.id, boot.c.number)).all())
    names = dict(conn.execute(sa.select(session.c.id, session.c.name)).all())
    frames: dict[tuple[int, int, str], list[tuple[int, int, str]]] = {}
    for mid, bid, pfn, order, who, h in conn.execute(sa.select(*preservation.c)):
        frames.setdefault((mid, bid, who), []).append((pfn, order, h))
    for e in conn.execute(sa.select(entry)).mappings().all():
        tag = owner_tag(e["domain_id"]) if e["kind"] == "domain" and e["domain_id"] is not None else None
        own = [] if tag is None else frames.get((e["machine_id"], e["boot_id"], tag), [])
        digest = entry_digest(
            machine_id=e["machine_id"],
            boot_id=e["boot_id"],
            boot_number=numbers[e["boot_id"]],
            token=_u64(e["token"]),
            kind=e["kind"],
            compatible=e["compatible"],
            descriptor=e["descriptor"],
            domain_id=e["domain_id"],
            device_id=e["device_id"],
            session_id=e["session_id"],
            session_name=names.get(e["session_id"]) if e["session_id"] is not None else None,
        )
        conn.execute(
            entry.update().where(entry.c.id == e["id"]).values(digest=digest, frames_digest=frames_digest(own))
        )
    for bid, number in conn.execute(sa.select(boot.c.id, boot.c.number).where(boot.c.end_kind == "liveupdate")).all():
        entries = conn.execute(
            sa.select(entry.c.token, entry.c.digest, entry.c.frames_digest).where(entry.c.boot_id == bid)
        ).all()
        sessions = conn.execute(sa.select(session.c.id, session.c.name).where(session.c.boot_id == bid)).all()
        kept = conn.execute(
            sa.select(
                preservation.c.pfn, preservation.c.page_order, preservation.c.preserved_by, preservation.c.content_hash
            ).where(preservation.c.boot_id == bid)
        ).all()
        digest = seal_digest(
            boot_id=bid,
            boot_number=number,
            entries=[(_u64(t), d, f) for t, d, f in entries],
            sessions=[tuple(s) for s in sessions],
            preservations=[tuple(p) for p in kept],
        )
        conn.execute(boot.update().where(boot.c.id == bid).values(handover_digest=digest))


def upgrade() -> None:
    with op.batch_alter_table("boot", schema=None) as batch_op:
        batch_op.add_column(sa.Column("handover_digest", sa.String(length=64), nullable=True))
    with op.batch_alter_table("handover_entry", schema=None) as batch_op:
        batch_op.add_column(sa.Column("digest", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("frames_digest", sa.String(length=64), nullable=True))
    _fill(op.get_bind())
    with op.batch_alter_table("handover_entry", schema=None) as batch_op:
        batch_op.alter_column("digest", existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column("frames_digest", existing_type=sa.String(length=64), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("handover_entry", schema=None) as batch_op:
        batch_op.drop_column("frames_digest")
        batch_op.drop_column("digest")
    with op.batch_alter_table("boot", schema=None) as batch_op:
        batch_op.drop_column("handover_digest")
