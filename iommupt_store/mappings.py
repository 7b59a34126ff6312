"""The mapping ledger: every domain's leaves as maximal runs, kept in SQL.

A *run* is a stretch of leaves of one page size that is contiguous in both
IOVA and physical address, with the same permissions and attribute bits, and
as long as possible (two runs that could be joined never both exist). Runs
never cross 2^63, so that an address stored in two's complement compares in
SQL as it does unsigned within one run.

The ledger is written in the same transaction as the frames, by the domain
operations (map adds the engine's segments, unmap cuts the range it really
removed, free drops the domain, restore moves the runs to the new domain),
and ``fsck`` compares it with the hardware walker. It is what the
``mapping`` view shows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from sqlalchemy import Table, delete, insert, select, update

from .db.models import Domain, MappingRun
from .formats.base import PageTableFormat, pgsz_lg2_to_level
from .formats.describe import leaf_flags, permissions
from .machine import Transaction
from .pagetable.engine import PageTable
from .pagetable.walker import HardwareWalker

_SIGN = 1 << 63


@dataclass(frozen=True)
class Run:
    iova: int
    phys: int
    size: int
    page_size: int
    readable: bool
    writable: bool
    flags: tuple[str, ...]

    @property
    def last(self) -> int:
        return self.iova + self.size - 1

    def joins(self, nxt: Run) -> bool:
        """Whether ``nxt`` continues this run exactly."""
        return (
            nxt.iova == self.iova + self.size
            and nxt.phys == self.phys + self.size
            and (nxt.page_size, nxt.readable, nxt.writable, nxt.flags)
            == (self.page_size, self.readable, self.writable, self.flags)
            and nxt.iova != _SIGN
        )

    def cut(self, first: int, last: int) -> list[Run]:
        """What is left of this run once ``[first, last]`` is taken out."""
        out = []
        if first > self.iova:
            out.append(replace(self, size=first - self.iova))
        if last < self.last:
            skip = last + 1 - self.iova
            out.append(replace(self, iova=last + 1, phys=self.phys + skip, size=self.size - skip))
        return out


def split_at_sign(run: Run) -> list[Run]:
    """A run that crosses 2^63 (only a 64-bit VA can) as two runs."""
    return _split(run, _SIGN)


def _split(run: Run, at: int) -> list[Run]:
    if run.iova < at <= run.last:
        return [
            replace(run, size=at - run.iova),
            replace(run, iova=at, phys=run.phys + at - run.iova, size=run.last + 1 - at),
        ]
    return [run]


def canonical(runs: Iterable[Run], vasz: int, sign_extend: bool) -> list[Run]:
    """Runs at the IOVAs the hardware translates: with sign extension, the kernel lets a
    range run from the top of the lower half into the upper half's first top entry,
    which the IOMMU sees at the sign-extended address."""
    if not sign_extend or vasz >= 64:
        return list(runs)
    half = 1 << (vasz - 1)
    prefix = ((1 << 64) - 1) ^ ((1 << vasz) - 1)
    out = []
    for run in runs:
        for part in _split(run, half):
            if half <= part.iova < _SIGN:
                part = replace(part, iova=part.iova | prefix)
            out.append(part)
    return out


def leaf_run(fmt: PageTableFormat, iova: int, phys: int, size: int, page_size: int, raw: int) -> Run:
    """A run of leaves whose entries look like ``raw``."""
    readable, writable = permissions(fmt.name, raw)
    return Run(iova, phys, size, page_size, readable, writable, tuple(leaf_flags(fmt.name, raw)))


def coalesce(runs: Iterable[Run]) -> Iterator[Run]:
    """Join neighbouring runs into maximal ones (the input in ascending IOVA order)."""
    cur: Run | None = None
    for run in runs:
        for part in split_at_sign(run):
            if cur is not None and cur.joins(part):
                cur = replace(cur, size=cur.size + part.size)
                continue
            if cur is not None:
                yield cur
            cur = part
    if cur is not None:
        yield cur


def walker_runs(walker: HardwareWalker) -> list[Run]:
    """The maximal runs the hardware walker finds in a domain's frames."""
    fmt = walker.fmt
    # the walk yields leaves in ascending IOVA order, one at a time: only the runs are held
    entries = walker.iter_leaf_entries()
    return list(coalesce(leaf_run(fmt, iova, phys, size, size, raw) for iova, phys, size, _lvl, raw in entries))


def segment_runs(pt: PageTable, segments: Iterable[tuple[int, int, int, int]], prot: int) -> list[Run]:
    """The runs a successful map installed: ``segments`` as the engine reports them
    (iova, phys, length, page size), each leaf written for ``prot``."""
    fmt, attrs = pt.fmt, pt.fmt.leaf_attrs(prot, pt.features)
    out = []
    for iova, phys, length, page_size in segments:
        size_lg2 = page_size.bit_length() - 1
        raw = fmt.encode_leaf(phys, pgsz_lg2_to_level(size_lg2), size_lg2, attrs)
        out.append(leaf_run(fmt, iova, phys, length, page_size, raw))
    return list(coalesce(canonical(out, pt.range_vasz(), pt.sign_extend)))


def removed_ranges(pt: PageTable, iova: int, length: int) -> list[tuple[int, int]]:
    """``[iova, iova+length)`` that an unmap removed, as inclusive ranges at the hardware's IOVAs."""
    if length <= 0:
        return []
    probe = Run(iova, 0, length, 1, False, False, ())
    return [(r.iova, r.last) for r in canonical([probe], pt.range_vasz(), pt.sign_extend)]


# -- the stored ledger --------------------------------------------------------------------
_T: Table = MappingRun.__table__  # type: ignore[assignment]


def _from_row(row: object) -> Run:
    r = row._mapping  # type: ignore[attr-defined]
    return Run(
        iova=r["iova"],
        phys=r["phys"],
        size=r["size"],
        page_size=r["page_size"],
        readable=bool(r["readable"]),
        writable=bool(r["writable"]),
        flags=tuple(json.loads(r["flags"])),
    )


def _values(domain_id: int, run: Run) -> dict[str, object]:
    return {
        "domain_id": domain_id,
        "iova": run.iova,
        "last_iova": run.last,
        "phys": run.phys,
        "size": run.size,
        "page_size": run.page_size,
        "readable": run.readable,
        "writable": run.writable,
        "flags": json.dumps(list(run.flags)),
    }


def stored_runs(tx: Transaction, domain_id: int) -> list[Run]:
    """The ledger's runs of a domain, in ascending unsigned IOVA order."""
    rows = tx.conn.execute(select(_T).where(_T.c.domain_id == domain_id)).all()
    return sorted((_from_row(r) for r in rows), key=lambda r: r.iova)


def _overlapping(tx: Transaction, domain_id: int, first: int, last: int) -> list[tuple[int, Run]]:
    """Stored runs that overlap ``[first, last]``, which lies within one half of the 64-bit space."""
    rows = tx.conn.execute(
        select(_T).where(_T.c.domain_id == domain_id, _T.c.iova <= last, _T.c.last_iova >= first)
    ).all()
    return [(r.id, _from_row(r)) for r in rows]


def _halves(first: int, last: int) -> list[tuple[int, int]]:
    if first < _SIGN <= last:
        return [(first, _SIGN - 1), (_SIGN, last)]
    return [(first, last)]


def record_map(tx: Transaction, domain_id: int, runs: Iterable[Run]) -> None:
    """Add freshly mapped runs, joining them with their stored neighbours."""
    for run in runs:
        for part in split_at_sign(run):
            _insert_joined(tx, domain_id, part)


def _insert_joined(tx: Transaction, domain_id: int, run: Run) -> None:
    c = _T.c
    gone: list[int] = []
    if run.iova != 0 and run.iova != _SIGN:
        for row in tx.conn.execute(
            select(_T).where(c.domain_id == domain_id, c.last_iova == run.iova - 1, c.page_size == run.page_size)
        ).all():
            prev = _from_row(row)
            if prev.joins(run):
                run, gone = replace(prev, size=prev.size + run.size), [*gone, row.id]
    nxt_iova = run.last + 1
    if nxt_iova < 1 << 64 and nxt_iova != _SIGN:
        for row in tx.conn.execute(
            select(_T).where(c.domain_id == domain_id, c.iova == nxt_iova, c.page_size == run.page_size)
        ).all():
            nxt = _from_row(row)
            if run.joins(nxt):
                run, gone = replace(run, size=run.size + nxt.size), [*gone, row.id]
    if gone:
        tx.conn.execute(delete(_T).where(c.id.in_(gone)))
    tx.conn.execute(insert(_T).values(_values(domain_id, run)))


def record_unmap(tx: Transaction, domain_id: int, removed: Iterable[tuple[int, int]]) -> None:
    """Take the inclusive ranges an unmap really removed (``removed_ranges``) out of the ledger."""
    for first, last in (h for r in removed for h in _halves(*r)):
        hits = _overlapping(tx, domain_id, first, last)
        if not hits:
            continue
        tx.conn.execute(delete(_T).where(_T.c.id.in_([i for i, _ in hits])))
        rest = [part for _, run in hits for part in run.cut(first, last)]
        if rest:
            tx.conn.execute(insert(_T), [_values(domain_id, r) for r in rest])


def drop_domain(tx: Transaction, domain_id: int) -> None:
    tx.conn.execute(delete(_T).where(_T.c.domain_id == domain_id))


def drop_freed(tx: Transaction) -> None:
    """Forget the runs of domains that a reboot or a new boot freed wholesale."""
    freed = select(Domain.id).where(Domain.machine_id == tx.machine.id, Domain.state == "freed")
    tx.conn.execute(delete(_T).where(_T.c.domain_id.in_(freed)))


def move_domain(tx: Transaction, old_id: int, new_id: int) -> None:
    """The frames changed hands (restore): so do their runs."""
    tx.conn.execute(update(_T).where(_T.c.domain_id == old_id).values(domain_id=new_id))


def ledger_problems(tx: Transaction, domain_id: int, walker: HardwareWalker) -> list[str]:
    """How the stored runs of a domain differ from what its frames translate."""
    found = walker_runs(walker)
    stored = stored_runs(tx, domain_id)
    if found == stored:
        return []
    stored_set, found_set = set(stored), set(found)
    missing = [r for r in found if r not in stored_set]
    extra = [r for r in stored if r not in found_set]
    out = []
    for r in missing[:3]:
        out.append(
            f"domain {domain_id}: frames map [{r.iova:#x}, {r.last:#x}] -> {r.phys:#x}, the mapping table does not"
        )
    for r in extra[:3]:
        out.append(
            f"domain {domain_id}: the mapping table has [{r.iova:#x}, {r.last:#x}] -> {r.phys:#x}, the frames do not"
        )
    hidden = len(missing) + len(extra) - min(len(missing), 3) - min(len(extra), 3)
    if hidden:
        out.append(f"domain {domain_id}: {hidden} more mapping difference(s)")
    return out


__all__ = [
    "Run",
    "coalesce",
    "drop_domain",
    "drop_freed",
    "ledger_problems",
    "move_domain",
    "record_map",
    "record_unmap",
    "segment_runs",
    "stored_runs",
    "walker_runs",
]
