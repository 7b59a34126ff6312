"""``fsck``: check the model's invariants on what the database holds (DESIGN §3).

Reads only; reports every problem found rather than stopping at the first:
- every table reachable from a domain's top is a frame of that domain at the
  right level, reached once (no cycles, no sharing), and every frame of a
  domain is reachable (no orphans); freed domains own no frames;
- a preserved domain's reachable frames are exactly the frames preserved for
  it, with the bytes they had when preserved;
- devices are attached only to domains that still exist;
- SQLite's own integrity and foreign-key checks pass.
"""

from __future__ import annotations

from sqlalchemy import select, text

from . import mappings
from .db.models import Device, Page
from .db.models import Domain as DomainRow
from .domains import hardware_walker
from .liveupdate.iommu import preservation_problems
from .machine import Transaction
from .memory import PAGE_SHIFT
from .pagetable.walker import TableInfo, WalkError
from .reports import FsckReport


def _tables(info: TableInfo) -> list[tuple[int, int]]:
    out = [(info.phys >> PAGE_SHIFT, info.level)]
    for child in info.children:
        out.extend(_tables(child))
    return out


def fsck(tx: Transaction) -> FsckReport:
    tx.flush()
    problems: list[str] = []
    mid = tx.machine.id
    frames: dict[int, dict[int, int]] = {}
    for pfn, domain_id, level in tx.conn.execute(
        select(Page.pfn, Page.domain_id, Page.level).where(Page.machine_id == mid, Page.domain_id.is_not(None))
    ):
        if domain_id is not None and level is not None:
            frames.setdefault(domain_id, {})[pfn] = level
    domains = tx.conn.execute(
        select(DomainRow.id, DomainRow.state, DomainRow.boot_id).where(DomainRow.machine_id == mid)
    ).all()
    checked = 0
    for domain_id, state, boot_id in domains:
        own = frames.pop(domain_id, {})
        if state == "freed":
            if own:
                problems.append(f"freed domain {domain_id} still owns {len(own)} frame(s)")
            continue
        checked += 1
        try:
            walker = hardware_walker(tx, domain_id)
            reached = _tables(walker.tables())
            problems += mappings.ledger_problems(tx, domain_id, walker)
        except WalkError as e:
            problems.append(f"domain {domain_id}: {e}")
            continue
        for pfn, level in reached:
            if own.get(pfn) != level:
                problems.append(f"domain {domain_id}: table {pfn:#x} is not its level-{level} frame")
        orphans = set(own) - {pfn for pfn, _ in reached}
        if orphans:
            problems.append(f"domain {domain_id}: {len(orphans)} frame(s) unreachable from the top (leaked)")
        if state == "preserved":
            reachable = {pfn for pfn, _ in reached}
            problems += [f"preserved {p}" for p in preservation_problems(tx, domain_id, reachable, boot_id)]
    for domain_id, own in frames.items():
        problems.append(f"{len(own)} frame(s) belong to domain {domain_id}, which does not exist")
    live = {d for d, state, _ in domains if state != "freed"}
    for bdf, domain_id in tx.conn.execute(
        select(Device.bdf, Device.domain_id).where(Device.machine_id == mid, Device.domain_id.is_not(None))
    ):
        if domain_id not in live:
            problems.append(f"device {bdf} is attached to domain {domain_id}, which is freed or missing")
    if tx.conn.dialect.name == "sqlite":
        ok = tx.conn.execute(text("PRAGMA integrity_check")).scalar()
        if ok != "ok":
            problems.append(f"sqlite integrity_check: {ok}")
        bad = tx.conn.execute(text("PRAGMA foreign_key_check")).fetchall()
        if bad:
            problems.append(f"sqlite foreign_key_check: {len(bad)} broken reference(s)")
    return FsckReport(
        machine=tx.machine.name,
        boot=tx.machine.boot_number,
        domains_checked=checked,
        problems=problems,
        ok=not problems,
    )
