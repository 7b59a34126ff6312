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

import heapq
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import Connection, Table, bindparam, select, update

from .db.bulk import delete_in, execute_many, insert_rows
from .db.models import Page
from .errors import InvalidArgument, NotFound, OutOfMemory

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
MAX_ORDER = 18
#: the first MiB is firmware's, as on a PC: never handed out, so phys 0 is never a table
FIRST_PFN = 0x100

_PAGES: Table = Page.__table__  # type: ignore[assignment]
_META_COLS = [c for c in _PAGES.c if c.name not in ("machine_id", "pfn", "page_order", "contents")]
_NATIVE_LE = sys.byteorder == "little"
_CHUNK = 500
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


class Allocator:
    """Lowest-first allocator over the set of allocated blocks."""

    def __init__(self, npages: int, allocated: Iterable[tuple[int, int]]) -> None:
        self.npages = npages
        self.covered: set[int] = set()
        self.top = FIRST_PFN
        for pfn, order in allocated:
            self.covered.update(range(pfn, pfn + (1 << order)))
            self.top = max(self.top, pfn + (1 << order))
        # every free pfn below ``top``; stale entries are skipped when popped
        self.holes = [p for p in range(FIRST_PFN, self.top) if p not in self.covered]
        heapq.heapify(self.holes)

    def alloc(self, order: int) -> int:
        size = 1 << order
        if order == 0:
            while self.holes:
                pfn = heapq.heappop(self.holes)
                if pfn not in self.covered:
                    self.covered.add(pfn)
                    return pfn
            return self._take_top(self.top, 1)
        start = self._first_fit(size)
        self.covered.update(range(start, start + size))
        return start

    def _first_fit(self, size: int) -> int:
        cand = (FIRST_PFN + size - 1) & ~(size - 1)
        while cand < self.top:
            clash = next((p for p in range(cand, min(cand + size, self.top)) if p in self.covered), None)
            if clash is None:
                return cand if cand + size <= self.top else self._take_top(cand, size)
            cand = (clash + size) & ~(size - 1)
        return self._take_top(cand, size)

    def _take_top(self, start: int, size: int) -> int:
        if start + size > self.npages:
            raise OutOfMemory(
                f"machine memory exhausted: no free block of {size} page(s) "
                f"({self.npages * PAGE_SIZE >> 20} MiB machine)"
            )
        for p in range(self.top, start):
            heapq.heappush(self.holes, p)
        self.top = max(self.top, start + size)
        if size == 1:
            self.covered.add(start)
        return start

    def free(self, pfn: int, order: int) -> None:
        for p in range(pfn, pfn + (1 << order)):
            self.covered.discard(p)
            heapq.heappush(self.holes, p)


class Memory:
    """Pages of one machine, as seen by one transaction."""

    def __init__(self, conn: Connection, machine_id: int, boot_id: int, npages: int) -> None:
        self.conn = conn
        self.machine_id = machine_id
        self.boot_id = boot_id
        self.npages = npages
        self._cache: dict[int, _CachedPage] = {}
        self._allocator: Allocator | None = None
        #: pfn -> the page as it was before the current call first changed it (None: not cached)
        self._undo: dict[int, _CachedPage | None] | None = None

    # -- undo log: one API call all or nothing, without flushing before it -------------
    def start_undo_log(self) -> None:
        """From now on, remember each page as it was before it is first changed (see ``undo``)."""
        self._undo = {}

    def drop_undo_log(self) -> None:
        self._undo = None

    def undo(self) -> None:
        """Put every page back as it was at ``start_undo_log`` (the database is rolled back alongside)."""
        for pfn, before in (self._undo or {}).items():
            if before is None:
                self._cache.pop(pfn, None)
            else:
                self._cache[pfn] = before
        self._undo = None
        self._allocator = None  # rebuilt from the database and the cache as they are now

    def _save(self, pfn: int) -> None:
        if self._undo is None or pfn in self._undo:
            return
        page = self._cache.get(pfn)
        self._undo[pfn] = (
            None
            if page is None
            else replace(
                page,
                meta=dict(page.meta),
                contents=None if page.contents is None else bytearray(page.contents),
                meta_dirty=set(page.meta_dirty),
            )
        )

    # -- allocation ------------------------------------------------------------
    @property
    def allocator(self) -> Allocator:
        if self._allocator is None:
            rows = self.conn.execute(
                select(_PAGES.c.pfn, _PAGES.c.page_order).where(_PAGES.c.machine_id == self.machine_id)
            )
            allocated = {pfn: order for pfn, order in rows}
            # reflect this transaction's own changes on top of what is stored
            for pfn, page in self._cache.items():
                if page.freed:
                    allocated.pop(pfn, None)
                else:
                    allocated[pfn] = page.order
            self._allocator = Allocator(self.npages, allocated.items())
        return self._allocator

    def alloc(self, owner: str, order: int = 0, **meta: Any) -> int:
        """Allocate a zeroed block of ``2**order`` pages; returns its first PFN."""
        if not 0 <= order <= MAX_ORDER:
            raise InvalidArgument(f"page order {order} is outside 0..{MAX_ORDER}")
        _check_meta(meta)
        pfn = self.allocator.alloc(order)
        self._save(pfn)
        old = self._cache.get(pfn)
        page = _CachedPage(
            order=order,
            meta={"owner": owner, "boot_id": self.boot_id, **meta},
            contents=bytearray(PAGE_SIZE << order),
            in_db=old is not None and old.in_db,  # a block freed and re-used in one transaction
            contents_dirty=True,
        )
        if page.in_db:
            page.meta_dirty = set(page.meta) | {"page_order"}
        self._cache[pfn] = page
        return pfn

    def free(self, pfn: int) -> None:
        page = self._page(pfn)
        self._save(pfn)
        page.freed = True
        self.allocator.free(pfn, page.order)

    # -- contents ----------------------------------------------------------------
    def _page(self, pfn: int) -> _CachedPage:
        page = self._cache.get(pfn)
        if page is None:
            self.load([pfn])
            page = self._cache.get(pfn)
        if page is None or page.freed:
            raise NotFound(f"pfn {pfn:#x} is not allocated memory of this machine")
        return page

    def load(self, pfns: Iterable[int]) -> None:
        """Bring pages into the cache with one query per chunk (missing ones are skipped)."""
        wanted = [p for p in pfns if p not in self._cache or self._cache[p].contents is None]
        for i in range(0, len(wanted), _CHUNK):
            self._fetch(_PAGES.c.pfn.in_(wanted[i : i + _CHUNK]))

    def load_matching(self, **where: Any) -> list[int]:
        """Bring every page whose metadata columns equal ``where`` into the cache;
        returns their PFNs (one query)."""
        found = self._fetch(*[_PAGES.c[k] == v for k, v in where.items()], keep_cached=True)
        return [p for p in found if not self._cache[p].freed]

    def _fetch(self, *cond: Any, keep_cached: bool = False) -> list[int]:
        names = [c.name for c in _META_COLS]
        rows = self.conn.execute(
            select(_PAGES.c.pfn, _PAGES.c.page_order, _PAGES.c.contents, *_META_COLS).where(
                _PAGES.c.machine_id == self.machine_id, *cond
            )
        ).all()  # fetchall: much cheaper per row than iterating the cursor
        found = []
        for pfn, order, contents, *meta in rows:
            found.append(pfn)
            if keep_cached and pfn in self._cache:
                continue  # this transaction's copy is newer
            self._cache[pfn] = _CachedPage(
                order=order, meta=dict(zip(names, meta, strict=True)), contents=bytearray(contents)
            )
        return found

    def is_allocated(self, pfn: int) -> bool:
        try:
            self._page(pfn)
        except NotFound:
            return False
        return True

    def order(self, pfn: int) -> int:
        return self._page(pfn).order

    def meta(self, pfn: int) -> Mapping[str, Any]:
        return self._page(pfn).meta

    def set_meta(self, pfn: int, **values: Any) -> None:
        _check_meta(values)
        page = self._page(pfn)
        self._save(pfn)
        page.meta.update(values)
        page.meta_dirty.update(values)

    def view(self, pfn: int) -> memoryview:
        """The page's bytes, read-only and without a copy (e.g. to hash them)."""
        contents = self._page(pfn).contents
        assert contents is not None
        return memoryview(contents).toreadonly()

    def read(self, pfn: int) -> bytes:
        contents = self._page(pfn).contents
        assert contents is not None
        return bytes(contents)

    def write(self, pfn: int, data: bytes, offset: int = 0) -> None:
        page = self._page(pfn)
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
        page = self._page(pfn)
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
            page.contents_dirty = False
            page.meta_dirty.clear()
        return written
