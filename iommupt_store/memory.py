"""A machine's physical memory for one unit of work.

The only place that reads or writes page rows. Pages are loaded on first use
and kept in a cache; allocation, frees, content writes and metadata changes
stay in memory until ``flush``, which writes each touched page once, in bulk
(one INSERT, UPDATE and DELETE statement each, executed many). A unit of work
that is abandoned (an exception) leaves the database untouched.

Allocation is deterministic: the lowest free, naturally aligned block of
``2**order`` pages, searched from ``FIRST_PFN``. The same sequence of calls on
the same stored state gives the same PFNs.
"""

from __future__ import annotations

import bisect
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import (
    Connection,
    Table,
    bindparam,
    func,
    or_,
    select,
    update,
)

from .db.bulk import delete_in, execute_many, insert_rows, one_of
from .db.models import Machine, Page
from .db.types import MalformedValue
from .errors import InvalidArgument, NotFound, OutOfMemory
from .units import PAGE_SHIFT as PAGE_SHIFT
from .units import PAGE_SIZE as PAGE_SIZE

MAX_ORDER = 18
#: the first MiB is firmware's, as on a PC: never handed out, so phys 0 is never a table
FIRST_PFN = 0x100

_PAGES: Table = Page.__table__  # type: ignore[assignment]
_MACHINES: Table = Machine.__table__  # type: ignore[assignment]
_META_COLS = [c for c in _PAGES.c if c.name not in ("machine_id", "pfn", "page_order", "contents")]
_META_NAMES = [c.name for c in _META_COLS]
_NATIVE_LE = sys.byteorder == "little"
_CHUNK = 500
#: pages a transaction keeps in memory before it writes changed ones and drops unchanged ones
CACHE_PAGES = 4096
#: free extents read per allocator window
_GAPS = 256
#: page columns that callers may set through ``alloc(**meta)`` / ``set_meta``
_META_COLUMNS = frozenset(c.name for c in _PAGES.c) - {"machine_id", "pfn", "page_order", "contents"}


def _check_meta(keys: Iterable[str]) -> None:
    unknown = set(keys) - _META_COLUMNS
    if unknown:
        raise InvalidArgument(f"unknown page column(s): {', '.join(sorted(unknown))}")


@dataclass
class _CachedPage:
    order: int
    meta: dict[str, Any]
    contents: bytearray | None = None  # None: not loaded yet
    in_db: bool = True
    freed: bool = False
    contents_dirty: bool = False
    meta_dirty: set[str] = field(default_factory=set)
    #: the undoable call that last changed (or read) the page; see ``Memory.start_undo_log``
    call: int = 0


class Allocator:
    """Lowest-first allocator that reads free space from the database a window at a time.

    ``[FIRST_PFN, hi)`` is known exactly as a sorted list of free extents: the
    gaps the database showed when the window was read, with this transaction's
    allocations and frees applied since. A request the window cannot serve
    extends it with the next gaps (``fetch_gaps``, after a flush so that the
    database shows this transaction's frees). No page number that is allocated
    is ever held, only the holes between them.
    """

    def __init__(
        self, npages: int, fetch_gaps: Callable[[int], tuple[list[tuple[int, int]], int]], start: int = FIRST_PFN
    ) -> None:
        self.npages = npages
        self._fetch_gaps = fetch_gaps
        #: no pfn below ``start`` is free (the stored hint), so the window begins there
        self.start = self.hi = min(max(start, FIRST_PFN), npages)
        self.extents: list[list[int]] = []  # [start, end) free, ascending, never touching

    @classmethod
    def over(cls, npages: int, allocated: Iterable[tuple[int, int]]) -> Allocator:
        """An allocator over a known list of allocated ``(pfn, order)`` blocks (no database)."""
        blocks = sorted(allocated)

        def gaps(pos: int) -> tuple[list[tuple[int, int]], int]:
            out, at = [], pos
            for pfn, order in blocks:
                if pfn >= at:
                    out.append((at, pfn))
                at = max(at, pfn + (1 << order))
            return [*out, (at, npages)], npages

        return cls(npages, gaps)

    def alloc(self, order: int) -> int:
        size = 1 << order
        while True:
            for idx, ext in enumerate(self.extents):
                start = (ext[0] + size - 1) & ~(size - 1)
                if start + size <= ext[1]:
                    self._carve(idx, start, size)
                    return start
            if self.hi >= self.npages:
                if self.start > FIRST_PFN:  # a hint that is wrong (a hand edit) must not cost memory
                    self.start = self.hi = FIRST_PFN
                    self.extents = []
                    continue
                raise OutOfMemory(
                    f"machine memory exhausted: no free block of {size} page(s) "
                    f"({self.npages * PAGE_SIZE >> 20} MiB machine)"
                )
            self._extend()

    def _carve(self, idx: int, start: int, size: int) -> None:
        a, b = self.extents[idx]
        parts = [[a, start]] if a < start else []
        if start + size < b:
            parts.append([start + size, b])
        self.extents[idx : idx + 1] = parts

    def _extend(self) -> None:
        gaps, hi = self._fetch_gaps(self.hi)
        for a, b in gaps:
            self._add(a, min(b, self.npages))
        self.hi = max(hi, self.hi)

    def _add(self, a: int, b: int) -> None:
        if a >= b:
            return
        ext = self.extents
        idx = bisect.bisect_left(ext, [a, b])
        if idx and ext[idx - 1][1] >= a:  # joins (or overlaps) the extent before
            idx -= 1
            a = ext[idx][0]
            b = max(b, ext[idx][1])
            del ext[idx]
        while idx < len(ext) and ext[idx][0] <= b:  # joins the extents after
            b = max(b, ext[idx][1])
            del ext[idx]
        ext.insert(idx, [a, b])

    def lowest_free(self) -> int:
        """The lowest free pfn at or above ``start`` (``npages`` when there is none), reading
        further windows as needed: what the database holds decides it, not this window's history."""
        while not self.extents and self.hi < self.npages:
            self._extend()
        return self.extents[0][0] if self.extents else self.npages

    def free(self, pfn: int, order: int) -> None:
        # above the window the database will show it after the flush that precedes a window read
        if pfn < self.hi:
            self._add(pfn, min(pfn + (1 << order), self.hi))


class Memory:
    """Pages of one machine, as seen by one transaction."""

    def __init__(self, conn: Connection, machine_id: int, boot_id: int, npages: int) -> None:
        self.conn = conn
        self.machine_id = machine_id
        self.boot_id = boot_id
        self.npages = npages
        #: pages in use, oldest first; held to ``cache_pages`` by flushing and evicting (``_trim``)
        self._cache: dict[int, _CachedPage] = {}
        self.cache_pages = CACHE_PAGES
        self._allocator: Allocator | None = None
        #: the allocator hint as stored (``machine.free_from``)
        self._hint = 0
        #: allocations since the hint was last stored (a failed call's count too: it is recomputed)
        self._allocated = False
        self._storing_hint = False
        #: the undoable call in progress (0: none) and the last one started
        self._call = self._calls = 0
        #: copies of the pages the call changed that differed from the database before it
        self._undo: dict[int, _CachedPage] = {}

    # -- undo log: one API call all or nothing, without flushing before it -------------
    def start_undo_log(self) -> None:
        """From now on, be able to put every page back as it is now (see ``undo``).

        The savepoint restores the rows, so a page the call changes needs a copy
        only if this transaction had changed it without writing it yet: the log
        stays as small as the cache however many pages the call touches. Every
        page the call changes or reads is marked with the call's number.
        """
        self._calls += 1
        self._call = self._calls
        self._undo = {}

    def drop_undo_log(self) -> None:
        self._call = 0
        self._undo = {}

    def undo(self) -> None:
        """Put every page back as it was at ``start_undo_log`` (the database is rolled back alongside)."""
        for pfn in [p for p, page in self._cache.items() if page.call == self._call]:
            del self._cache[pfn]  # reloaded from the rolled-back database when next needed
        self._cache.update(self._undo)
        self.drop_undo_log()
        self._allocator = None  # rebuilt from the database and the cache as they are now

    def _save(self, pfn: int) -> None:
        page = self._cache.get(pfn)
        if not self._call or page is None or page.call == self._call:
            return
        if _unsaved(page):
            self._undo[pfn] = replace(
                page,
                meta=dict(page.meta),
                contents=None if page.contents is None else bytearray(page.contents),
                meta_dirty=set(page.meta_dirty),
            )
        page.call = self._call

    # -- allocation ------------------------------------------------------------
    @property
    def allocator(self) -> Allocator:
        if self._allocator is None:
            if any(_unsaved(page) for page in self._cache.values()):
                self.flush()  # this transaction's frees must have lowered the stored hint
            self._allocator = Allocator(self.npages, self._free_gaps, self._stored_hint() or FIRST_PFN)
            self._hint = self._allocator.start
        return self._allocator

    def _stored_hint(self) -> int | None:
        try:
            return self.conn.execute(select(_MACHINES.c.free_from).where(_MACHINES.c.id == self.machine_id)).scalar()
        except MalformedValue:  # derived data: a hand edit that broke it costs a search from the start, no more
            return None

    def hint_problem(self) -> str | None:
        """Whether the stored hint skips free memory (only a hand edit can make it do so)."""
        stored = self._stored_hint()
        lowest = Allocator(self.npages, self._free_gaps).lowest_free()  # searched from the first pfn
        if stored is None or stored <= lowest:
            return None
        return f"machine.free_from ({stored:#x}) is above the free pfn {lowest:#x}: allocation would skip free pages"

    def _store_hint(self) -> None:
        """After allocations, store the lowest free pfn as the hint (frees lower it again: a trigger
        on page rows). It is computed from the database, so any two transactions that leave the
        same pages store the same hint."""
        if not self._allocated or self._storing_hint:
            return
        self._storing_hint = True  # reading a window may flush, which comes back here
        try:
            lowest = self.allocator.lowest_free()  # an allocator an undo dropped is read again
        finally:
            self._storing_hint = False
        self._allocated = False
        if lowest != self._hint:
            self._hint = lowest
            self.conn.execute(update(_MACHINES).where(_MACHINES.c.id == self.machine_id).values(free_from=lowest))

    def _free_gaps(self, pos: int) -> tuple[list[tuple[int, int]], int]:
        """Up to ``_GAPS`` free extents from ``pos`` (free or a block's start) as the database
        holds them, and where the stretch they describe exactly ends."""
        if any(_unsaved(page) for page in self._cache.values()):
            self.flush()  # the database must show this transaction's own allocations and frees
        mine = _PAGES.c.machine_id == self.machine_id
        first = self.conn.execute(
            select(_PAGES.c.pfn).where(mine, _PAGES.c.pfn >= pos).order_by(_PAGES.c.pfn).limit(1)
        ).scalar()
        if first is None:
            return [(pos, self.npages)], self.npages
        gaps = [(pos, first)] if first > pos else []
        # the key alone (an index-only scan) finds the blocks not followed at once by another:
        # each ends before a hole or is larger than a page; only their orders are read
        nxt = func.lead(_PAGES.c.pfn).over(order_by=_PAGES.c.pfn).label("nxt")
        steps = select(_PAGES.c.pfn, nxt).where(mine, _PAGES.c.pfn >= pos).subquery()
        rows = self.conn.execute(
            select(steps.c.pfn, steps.c.nxt)
            .where(or_(steps.c.nxt.is_(None), steps.c.nxt > steps.c.pfn + 1))
            .order_by(steps.c.pfn)
            .limit(_GAPS)
        ).all()
        orders = self.block_orders([pfn for pfn, _ in rows])
        for pfn, n in rows:
            end = pfn + (1 << orders[pfn])
            if n is None or n > end:
                gaps.append((end, self.npages if n is None else n))
        # every hole up to the last block listed is known
        return gaps, rows[-1][1] if rows[-1][1] is not None else self.npages

    def alloc(self, owner: str, order: int = 0, **meta: Any) -> int:
        """Allocate a zeroed block of ``2**order`` pages; returns its first PFN."""
        if not 0 <= order <= MAX_ORDER:
            raise InvalidArgument(f"page order {order} is outside 0..{MAX_ORDER}")
        _check_meta(meta)
        pfn = self.allocator.alloc(order)
        self._allocated = True
        self._save(pfn)
        old = self._cache.get(pfn)
        page = _CachedPage(
            order=order,
            meta={"owner": owner, "boot_id": self.boot_id, **meta},
            contents=bytearray(PAGE_SIZE << order),
            in_db=old is not None and old.in_db,  # a block freed and re-used in one transaction
            contents_dirty=True,
            call=self._call,
        )
        if page.in_db:
            page.meta_dirty = set(page.meta) | {"page_order"}
        self._cache[pfn] = page
        self._trim()
        return pfn

    def free(self, pfn: int) -> None:
        page = self._page(pfn)
        allocator = self.allocator  # made first: making it may flush, which must not see this free yet
        self._save(pfn)
        page.freed = True
        allocator.free(pfn, page.order)

    # -- contents ----------------------------------------------------------------
    def _page(self, pfn: int, *, contents: bool = False) -> _CachedPage:
        """The cached page (its bytes loaded too if ``contents``)."""
        page = self._cache.get(pfn)
        if page is None or (contents and page.contents is None):
            self.load([pfn])
            page = self._cache.get(pfn)
        if page is None or page.freed:
            raise NotFound(f"pfn {pfn:#x} is not allocated memory of this machine")
        return page

    def load(self, pfns: Iterable[int]) -> None:
        """Bring pages into the cache with one query per chunk (missing ones are skipped)."""
        wanted = []
        for p in pfns:
            page = self._cache.pop(p, None)
            if page is not None:
                self._cache[p] = page  # now the newest: a trim while the rest load keeps it
            if page is None or page.contents is None:
                wanted.append(p)
        for i in range(0, len(wanted), _CHUNK):
            self._fetch(one_of(self.conn, _PAGES.c.pfn, wanted[i : i + _CHUNK]))

    def load_meta(self, pfns: Iterable[int]) -> None:
        """Bring pages not cached yet into the cache without their bytes (read when first needed):
        enough to check their columns and free them, at a fraction of the cost of a full load."""
        unknown = [p for p in pfns if p not in self._cache]
        for i in range(0, len(unknown), _CHUNK):
            rows = self.conn.execute(
                select(_PAGES.c.pfn, _PAGES.c.page_order, *_META_COLS).where(
                    _PAGES.c.machine_id == self.machine_id, one_of(self.conn, _PAGES.c.pfn, unknown[i : i + _CHUNK])
                )
            ).all()
            for pfn, order, *meta in rows:
                self._cache[pfn] = _CachedPage(
                    order=order, meta=dict(zip(_META_NAMES, meta, strict=True)), call=self._call
                )
            self._trim()

    def block_orders(self, pfns: Iterable[int]) -> dict[int, int]:
        """The order of each allocated block among ``pfns`` (others are left out), read without
        the pages' bytes."""
        out: dict[int, int] = {}
        unknown = []
        for pfn in pfns:
            page = self._cache.get(pfn)
            if page is None:
                unknown.append(pfn)
            elif not page.freed:
                out[pfn] = page.order
        for i in range(0, len(unknown), _CHUNK):
            rows = self.conn.execute(
                select(_PAGES.c.pfn, _PAGES.c.page_order).where(
                    _PAGES.c.machine_id == self.machine_id, one_of(self.conn, _PAGES.c.pfn, unknown[i : i + _CHUNK])
                )
            )
            out.update({pfn: order for pfn, order in rows})
        return out

    def batches(self, pfns: Iterable[int], size: int = _CHUNK) -> Iterator[list[int]]:
        """``pfns`` in lists of ``size``, each brought into the cache (one query) just before it
        is handed out: a pass over many pages holds only one batch of them."""
        batch: list[int] = []
        for pfn in pfns:
            batch.append(pfn)
            if len(batch) == size:
                self.load(batch)
                yield batch
                batch = []
        if batch:
            self.load(batch)
            yield batch

    def _fetch(self, *cond: Any) -> list[int]:
        rows = self.conn.execute(
            select(_PAGES.c.pfn, _PAGES.c.page_order, _PAGES.c.contents, *_META_COLS).where(
                _PAGES.c.machine_id == self.machine_id, *cond
            )
        ).all()  # fetchall: much cheaper per row than iterating the cursor
        found = []
        for pfn, order, contents, *meta in rows:
            found.append(pfn)
            known = self._cache.get(pfn)
            if known is not None and known.contents is None:  # loaded without its bytes: keep its changes
                known.contents = bytearray(contents)
                continue
            # read during a call: it may hold what the call wrote early, so an undo drops it
            self._cache[pfn] = _CachedPage(
                order=order,
                meta=dict(zip(_META_NAMES, meta, strict=True)),
                contents=bytearray(contents),
                call=self._call,
            )
        self._trim()
        return found

    def _trim(self) -> None:
        """Keep the cache bounded: past ``cache_pages``, write every changed page and drop the
        oldest unchanged ones no caller holds a view of, down to half the limit.

        Writing early changes nothing a caller can see: the database transaction is
        still all or nothing, and a page someone may still write through stays dirty.
        """
        if len(self._cache) <= self.cache_pages:
            return
        self.flush()
        excess = len(self._cache) - self.cache_pages // 2
        for pfn in [p for p, page in self._cache.items() if not _unsaved(page) and not _exported(page)][:excess]:
            del self._cache[pfn]

    def is_allocated(self, pfn: int) -> bool:
        try:
            self._page(pfn)
        except NotFound:
            return False
        return True

    def order(self, pfn: int) -> int:
        return self._page(pfn).order

    def nbytes(self, pfn: int) -> int:
        """How many bytes the block holds as stored (``PAGE_SIZE << order`` unless a hand edit changed it)."""
        contents = self._page(pfn, contents=True).contents
        assert contents is not None
        return len(contents)

    def meta(self, pfn: int) -> Mapping[str, Any]:
        return self._page(pfn).meta

    def set_meta(self, pfn: int, **values: Any) -> None:
        _check_meta(values)
        page = self._page(pfn)
        self._save(pfn)
        page.meta.update(values)
        page.meta_dirty.update(values)

    def set_meta_many(self, pfns: Sequence[int], **values: Any) -> None:
        """``set_meta`` of the same values on many allocated pages: one UPDATE per chunk of
        rows, none of them read (a cached page is changed in place, undoably)."""
        _check_meta(values)
        for pfn in pfns:
            page = self._cache.get(pfn)
            if page is not None:
                self._save(pfn)
                page.meta.update(values)
        for i in range(0, len(pfns), _CHUNK):
            self.conn.execute(
                update(_PAGES)
                .where(_PAGES.c.machine_id == self.machine_id, one_of(self.conn, _PAGES.c.pfn, pfns[i : i + _CHUNK]))
                .values(**values)
            )

    def view(self, pfn: int) -> memoryview:
        """The page's bytes, read-only and without a copy (e.g. to hash them)."""
        contents = self._page(pfn, contents=True).contents
        assert contents is not None
        return memoryview(contents).toreadonly()

    def read(self, pfn: int) -> bytes:
        contents = self._page(pfn, contents=True).contents
        assert contents is not None
        return bytes(contents)

    def write(self, pfn: int, data: bytes, offset: int = 0) -> None:
        page = self._page(pfn, contents=True)
        self._save(pfn)
        assert page.contents is not None
        if offset < 0 or offset + len(data) > len(page.contents):
            raise InvalidArgument(f"write of {len(data)} bytes at {offset} overflows pfn {pfn:#x}")
        page.contents[offset : offset + len(data)] = data
        page.contents_dirty = True

    def words(self, pfn: int) -> memoryview:
        """The page as u64 words, read-only."""
        return self.words_rw(pfn, _dirty=False).toreadonly()

    def words_rw(self, pfn: int, *, _dirty: bool = True) -> memoryview:
        """The page as writable u64 words; the page is written back at flush."""
        page = self._page(pfn, contents=True)
        assert page.contents is not None
        if not _NATIVE_LE:  # pragma: no cover - big-endian hosts would need byte swapping
            raise NotImplementedError("iommupt-store needs a little-endian host")
        if _dirty:
            self._save(pfn)
            page.contents_dirty = True
        return memoryview(page.contents).cast("Q")

    # -- persistence -------------------------------------------------------------
    def flush(self) -> int:
        """Write every touched page once, in bulk. Returns the number of pages written."""
        inserts: list[dict[str, Any]] = []
        updates: dict[frozenset[str], list[dict[str, Any]]] = {}
        deletes: list[int] = []
        for pfn, page in self._cache.items():
            if page.freed or not page.in_db or page.contents_dirty or page.meta_dirty:
                self._save(pfn)  # its flags change below (a flush inside an undoable call)
            if page.freed:
                if page.in_db:
                    deletes.append(pfn)
                continue
            if not page.in_db:
                assert page.contents is not None
                inserts.append(
                    {
                        "machine_id": self.machine_id,
                        "pfn": pfn,
                        "page_order": page.order,
                        "contents": bytes(page.contents),
                        **page.meta,
                    }
                )
                continue
            cols: set[str] = set(page.meta_dirty)
            if page.contents_dirty:
                cols.add("contents")
            if not cols:
                continue
            row: dict[str, Any] = {"b_pfn": pfn}
            for c in cols:
                if c == "contents":
                    assert page.contents is not None
                    row["contents"] = bytes(page.contents)
                elif c == "page_order":
                    row["page_order"] = page.order
                else:
                    row[c] = page.meta[c]
            updates.setdefault(frozenset(cols), []).append(row)
        delete_in(self.conn, _PAGES, _PAGES.c.pfn, deletes, _PAGES.c.machine_id == self.machine_id)
        for changed, rows in updates.items():
            stmt = (
                update(_PAGES)
                .where(_PAGES.c.machine_id == self.machine_id, _PAGES.c.pfn == bindparam("b_pfn"))
                .values({c: bindparam(c) for c in changed})
            )
            execute_many(self.conn, stmt, rows)
        insert_rows(self.conn, _PAGES, inserts)
        written = len(inserts) + sum(len(r) for r in updates.values()) + len(deletes)
        for pfn in [p for p, pg in self._cache.items() if pg.freed]:
            del self._cache[pfn]
        for page in self._cache.values():
            page.in_db = True
            # a page someone holds a writable view of may still change: write it again next time
            page.contents_dirty = page.contents_dirty and _exported(page)
            page.meta_dirty.clear()
        self._store_hint()
        return written

    def release(self) -> None:
        """Drop every cached page (the transaction is over)."""
        self._cache = {}
        self._undo = {}
        self._call = 0
        self._allocator = None


def _unsaved(page: _CachedPage) -> bool:
    """Whether the page differs from its database row (or has none yet)."""
    return page.freed or not page.in_db or page.contents_dirty or bool(page.meta_dirty)


def _exported(page: _CachedPage) -> bool:
    """Whether a view of the page's bytes is alive (a bytearray with views cannot change size)."""
    buf = page.contents
    if buf is None:
        return False
    try:
        buf.append(0)
    except BufferError:
        return True
    buf.pop()
    return False
