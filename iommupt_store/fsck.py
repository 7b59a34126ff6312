"""``fsck``: check the model's invariants on what the database holds (DESIGN §3).

Reads only; reports every problem found rather than stopping at the first:
- every stored value is of its column's kind and every row keeps the schema's
  CHECK constraints (SQLite lets a hand edit break both);
- the boot history is possible (numbers 1..N, only the last running, ends
  recorded consistently, a seal exactly where a live update ended a boot);
- every table reachable from a domain's top is a frame of that domain at the
  right level, reached once (no cycles, no sharing), and every frame of a
  domain is reachable (no orphans); freed domains own no frames; a domain's
  state fits its boot;
- a preserved domain's reachable frames are exactly the frames preserved for
  it, with the bytes they had when preserved;
- every handover is what its boot recorded (entry, frame and seal digests),
  every descriptor validates and matches its domain, restored markers agree,
  sessions' states fit their boots, preserved devices match their entries,
  devices are attached only to domains that still exist;
- no page below the allocator's hint (``machine.free_from``) is free;
- SQLite's own integrity and foreign-key checks pass.
Whatever restore would refuse as bad data is reported here.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select, text

from . import mappings
from .boot_history import boot_history_problems
from .db.models import Boot, Page
from .db.models import Domain as DomainRow
from .db.rows import malformed_rows
from .domains import hardware_walker
from .liveupdate.audit import guarded, liveupdate_problems
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


def _domain(tx: Transaction, domain_id: int, state: str, boot_id: int, own: dict[int, int]) -> list[str]:
    """One domain that is not freed: its tables as reached from its top against the frames it owns."""
    try:
        walker = hardware_walker(tx, domain_id)
        reached = _tables(walker.tables())
        ledger = mappings.ledger_problems(tx, domain_id, walker)
    except WalkError as e:
        return [f"domain {domain_id}: {e.args[0]}"]
    problems = [
        f"domain {domain_id}: table {pfn:#x} is not its level-{level} frame"
        for pfn, level in reached
        if own.get(pfn) != level
    ]
    problems += ledger
    orphans = set(own) - {pfn for pfn, _ in reached}
    if orphans:
        problems.append(f"domain {domain_id}: {len(orphans)} frame(s) unreachable from the top (leaked)")
    if state == "preserved":
        reachable = {pfn for pfn, _ in reached}
        problems += [f"preserved {p}" for p in preservation_problems(tx, domain_id, reachable, boot_id)]
    return problems


def _state_fits_boot(domain_id: int, state: str, boot_id: int, boots: list[tuple[int, str | None]]) -> str | None:
    """A new boot frees every domain of the previous one except those it handed over (still preserved)."""
    ids = [b for b, _ in boots]
    if boot_id not in ids:
        return f"domain {domain_id} names boot row {boot_id}, which is not a boot of this machine"
    if state == "freed":
        return None
    last, prev = ids[-1], ids[-2] if len(ids) > 1 else None
    running = boots[-1][1] is None
    if boot_id == last or (state == "preserved" and running and boot_id == prev and boots[-2][1] == "liveupdate"):
        return None
    return f"domain {domain_id} is {state} but belongs to an earlier boot (row {boot_id}): it should be freed"


def _domains(tx: Transaction, progress: Callable[[int, int], None] | None = None) -> tuple[int, list[str]]:
    mid = tx.machine.id
    frames: dict[int, dict[int, int]] = {}
    for pfn, domain_id, level in tx.conn.execute(
        select(Page.pfn, Page.domain_id, Page.level).where(Page.machine_id == mid, Page.domain_id.is_not(None))
    ):
        if domain_id is not None and level is not None:
            frames.setdefault(domain_id, {})[pfn] = level
    boots = [
        (b, kind)
        for b, kind in tx.conn.execute(
            select(Boot.id, Boot.end_kind).where(Boot.machine_id == mid).order_by(Boot.number)
        ).all()
    ]
    domains = tx.conn.execute(
        select(DomainRow.id, DomainRow.state, DomainRow.boot_id).where(DomainRow.machine_id == mid)
    ).all()
    problems: list[str] = []
    checked = 0
    for done, (domain_id, state, boot_id) in enumerate(domains):
        if progress is not None:
            progress(done, len(domains))
        own = frames.pop(domain_id, {})
        wrong_boot = _state_fits_boot(domain_id, state, boot_id, boots)
        if wrong_boot:
            problems.append(wrong_boot)
        if state == "freed":
            if own:
                problems.append(f"freed domain {domain_id} still owns {len(own)} frame(s)")
            continue
        checked += 1
        problems += guarded(
            f"domain {domain_id}", lambda d=domain_id, s=state, b=boot_id, o=own: _domain(tx, d, s, b, o)
        )
    for domain_id, own in frames.items():
        problems.append(f"{len(own)} frame(s) belong to domain {domain_id}, which does not exist")
    return checked, problems


def fsck(tx: Transaction, progress: Callable[[int, int], None] | None = None) -> FsckReport:
    """Every invariant of the stored state; ``progress(done, total)`` counts the domains checked."""
    tx.flush()
    conn, mid = tx.conn, tx.machine.id
    problems = [f"stored data is malformed: {p}" for p in malformed_rows(conn, mid)]
    problems += [f"boot history: {p}" for p in boot_history_problems(conn, mid)]
    checked = 0
    if not problems:  # the deeper checks read values the two above vouch for
        checked, found = _domains(tx, progress)
        problems += found
        problems += liveupdate_problems(conn, mid)
        hint = tx.memory.hint_problem()
        if hint:
            problems.append(hint)
    if conn.dialect.name == "sqlite":
        ok = conn.execute(text("PRAGMA integrity_check")).scalar()
        if ok != "ok":
            problems.append(f"sqlite integrity_check: {ok}")
        bad = conn.execute(text("PRAGMA foreign_key_check")).fetchall()
        if bad:
            problems.append(f"sqlite foreign_key_check: {len(bad)} broken reference(s)")
    return FsckReport(
        machine=tx.machine.name,
        boot=tx.machine.boot_number,
        domains_checked=checked,
        problems=problems,
        ok=not problems,
    )
