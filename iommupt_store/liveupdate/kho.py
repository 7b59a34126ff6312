"""KHO-style preservation of pages across a live update.

A boot preserves (pfn, order) runs; the next boot may restore each exactly
once, at the same order, with unchanged bytes. Unlike the kernel we record who
preserved a page and a hash of its contents, and every misuse is a specific
error rather than a WARN or BUG_ON. Every call is all-or-nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, update

from ..db.bulk import insert_rows
from ..db.models import Boot, Preservation
from ..errors import AlreadyExists, BadData, InvalidArgument, NotFound, NotPermitted
from ..machine import Transaction, atomic

_CHUNK = 500


def content_hash(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class PreservedPage:
    id: int
    pfn: int
    order: int
    preserved_by: str
    content_hash: str
    restored_boot_id: int | None


def _boot_rows(tx: Transaction, boot_id: int) -> list[PreservedPage]:
    """Every preservation record of the boot (one query)."""
    p = Preservation.__table__.c  # Core columns: compiled without the ORM layer
    q = select(p.id, p.pfn, p.page_order, p.preserved_by, p.content_hash, p.restored_boot_id).where(
        p.machine_id == tx.machine.id, p.boot_id == boot_id
    )
    return [PreservedPage(*r) for r in tx.conn.execute(q).all()]


def _rows(tx: Transaction, boot_id: int, pfns: Sequence[int]) -> dict[int, PreservedPage]:
    """The boot's preservations of ``pfns`` (one query over the boot's records, filtered here:
    cheaper than a long IN list)."""
    wanted = set(pfns)
    return {r.pfn: r for r in _boot_rows(tx, boot_id) if r.pfn in wanted}


def preserved_by(tx: Transaction, who: str, boot_id: int | None = None) -> dict[int, PreservedPage]:
    """Every page ``who`` preserved in ``boot_id`` (default: the current boot)."""
    p = Preservation
    q = select(p.id, p.pfn, p.page_order, p.preserved_by, p.content_hash, p.restored_boot_id).where(
        p.machine_id == tx.machine.id,
        p.boot_id == (tx.machine.boot_id if boot_id is None else boot_id),
        p.preserved_by == who,
    )
    return {r.pfn: PreservedPage(*r) for r in tx.conn.execute(q).all()}


def preserved_pfns(tx: Transaction, who: str, boot_id: int) -> set[int]:
    """The pfns of every page ``who`` preserved in ``boot_id`` (just the numbers)."""
    p = Preservation
    q = select(p.pfn).where(p.machine_id == tx.machine.id, p.boot_id == boot_id, p.preserved_by == who)
    return set(tx.conn.execute(q).scalars())


@atomic
def preserve_pages(
    tx: Transaction, pages: Iterable[tuple[int, int]], who: str, *, domain_id: int | None = None
) -> list[tuple[int, int, str]]:
    """Record ``(pfn, order)`` runs as handed over by this boot (``kho_preserve_folio``); returns
    every page ``who`` has preserved in this boot, these included, as (pfn, order, content hash).

    ``domain_id`` names the domain whose table frames these are (recorded with each
    frame's level, for SQL inspection)."""
    pages = list(pages)
    orders = dict(pages)
    mem = tx.memory
    if len(orders) != len(pages):
        stored = mem.block_orders(orders)  # a listing that does not fit is named before the repeat
        for pfn, order in pages:
            _check_block(pfn, stored.get(pfn), order)
        raise InvalidArgument("the same pfn is listed twice")
    # a batch at a time, so that the pages are never all held; each batch is checked as it is read (its
    # blocks' orders come with it) and nothing is written before every check has passed
    new: list[tuple[int, int, str, int | None]] = []
    for batch in mem.batches(orders):
        for pfn in batch:
            _check_block(pfn, mem.order(pfn) if mem.is_allocated(pfn) else None, orders[pfn])
            level = mem.meta(pfn).get("level") if domain_id is not None else None
            new.append((pfn, orders[pfn], content_hash(mem.view(pfn)), level))
    recorded = _boot_rows(tx, tx.machine.boot_id)
    first = next((r for r in recorded if r.pfn in orders), None)
    if first is not None:
        raise AlreadyExists(f"pfn {first.pfn:#x} is already preserved in this boot (by {first.preserved_by})")
    owner = {"machine_id": tx.machine.id, "boot_id": tx.machine.boot_id, "preserved_by": who, "domain_id": domain_id}
    for i in range(0, len(new), _CHUNK):
        rows = [
            {**owner, "pfn": pfn, "page_order": order, "content_hash": h, "level": level}
            for pfn, order, h, level in new[i : i + _CHUNK]
        ]
        insert_rows(tx.conn, Preservation.__table__, rows)  # type: ignore[arg-type]
    own = [(r.pfn, r.order, r.content_hash) for r in recorded if r.preserved_by == who]
    return own + [(pfn, order, h) for pfn, order, h, _ in new]


def _check_block(pfn: int, stored: int | None, order: int) -> None:
    """``pfn`` must be an allocated block (of order ``stored``; None: not allocated) of exactly ``order``."""
    if stored is None:
        raise InvalidArgument(f"pfn {pfn:#x} is not allocated memory: nothing to preserve")
    if stored != order:
        raise InvalidArgument(f"pfn {pfn:#x} is an order-{stored} block, not order {order}")


@atomic
def unpreserve_pages(tx: Transaction, pages: Iterable[tuple[int, int]], who: str) -> None:
    """Drop this boot's records for exactly these runs; anything else is an error
    and no record is dropped (``kho_unpreserve_folio``)."""
    pages = list(pages)
    rows = _rows(tx, tx.machine.boot_id, [pfn for pfn, _ in pages])
    for pfn, order in pages:
        row = rows.get(pfn)
        if row is None:
            raise NotFound(f"pfn {pfn:#x} was never preserved in this boot")
        if row.preserved_by != who:
            raise NotPermitted(f"pfn {pfn:#x} was preserved by {row.preserved_by}, not {who}")
        if row.order != order:
            raise InvalidArgument(f"pfn {pfn:#x} was preserved at order {row.order}, not {order}")
    ids = [rows[pfn].id for pfn, _ in pages]
    for i in range(0, len(ids), _CHUNK):
        tx.conn.execute(delete(Preservation).where(Preservation.id.in_(ids[i : i + _CHUNK])))


def previous_boot(tx: Transaction) -> tuple[int, int, str | None]:
    """(id, number, end_kind) of the boot right before the current one."""
    row = tx.conn.execute(
        select(Boot.id, Boot.number, Boot.end_kind).where(
            Boot.machine_id == tx.machine.id, Boot.number == tx.machine.boot_number - 1
        )
    ).first()
    if row is None:
        raise NotFound(f"boot {tx.machine.boot_number} is the machine's first: nothing was handed over")
    return row.id, row.number, row.end_kind


def incoming_boot_id(tx: Transaction) -> int:
    """The previous boot, which must have ended with a sealed live update."""
    boot_id, number, end_kind = previous_boot(tx)
    if end_kind != "liveupdate":
        raise NotFound(f"boot {number} ended with a {end_kind or 'missing'} reboot: it handed nothing over")
    discarded = tx.conn.execute(select(Boot.handover_discarded).where(Boot.id == tx.machine.boot_id)).scalar()
    if discarded is not None:
        raise NotFound(f"this boot discarded the handover of boot {number} and booted as if cold: {discarded}")
    return boot_id


@atomic
def restore_pages(
    tx: Transaction, pages: Sequence[tuple[int, int]], who: str | None = None, *, meta: Mapping[str, Any] | None = None
) -> None:
    """Re-claim pages the previous boot preserved (``kho_restore_folio``), all or none.

    Each must be preserved by the previous (sealed) boot, at that order, by
    ``who`` when given, not yet restored, with the bytes it had when preserved.
    ``meta``: page columns the new owner sets on every page along with the boot
    (in bulk: no page is read again for it).
    """
    prev = incoming_boot_id(tx)
    mem = tx.memory
    p = Preservation
    # a chunk at a time (its records found by the boot's pfn key, its pages' bytes, its updates):
    # nothing held grows with the number of pages, and a refusal part-way is undone with the call
    for i in range(0, len(pages), _CHUNK):
        chunk = pages[i : i + _CHUNK]
        pfns = [pfn for pfn, _ in chunk]
        q = select(p.id, p.pfn, p.page_order, p.preserved_by, p.content_hash, p.restored_boot_id).where(
            p.machine_id == tx.machine.id, p.boot_id == prev, p.pfn.in_(pfns)
        )
        rows = {r.pfn: PreservedPage(*r) for r in tx.conn.execute(q).all()}
        mem.load(pfns)
        for pfn, order in chunk:
            row = rows.get(pfn)
            if row is None:
                raise NotFound(f"pfn {pfn:#x} was not preserved by the previous boot")
            if who is not None and row.preserved_by != who:
                raise NotPermitted(f"pfn {pfn:#x} was preserved by {row.preserved_by}, not {who}")
            if row.order != order:
                raise InvalidArgument(f"pfn {pfn:#x} was preserved at order {row.order}, not {order}")
            if row.restored_boot_id is not None:
                raise AlreadyExists(f"pfn {pfn:#x} has already been restored")
            if content_hash(mem.view(pfn)) != row.content_hash:
                raise BadData(f"pfn {pfn:#x} changed after it was preserved (content hash mismatch)")
        tx.conn.execute(
            update(p).where(p.id.in_([rows[pfn].id for pfn in pfns])).values(restored_boot_id=tx.machine.boot_id)
        )
        mem.set_meta_many(pfns, boot_id=tx.machine.boot_id, **(meta or {}))
