"""The generic page-table engine: one implementation for every format.

Follows drivers/iommu/generic_pt (the ``map_range`` era): greedy page-size
choice, lazy table allocation, top growth for formats with a dynamic top,
unmap that never splits a large page and stops at the first hole, and the
pre-order collect walk used by free and by live-update preservation.

It works on a ``FrameStore`` and knows nothing about databases.
"""

from __future__ import annotations

import functools
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import (
    AddressInUse,
    BadData,
    InvalidArgument,
    NoSuchAddress,
    NotSupported,
    OutOfRange,
    Overflow,
)
from ..formats import pgsize_bitmap as format_pgsize_bitmap
from ..formats.base import (
    ITEMS_PER_TABLE,
    TABLE_ITEMS_LG2,
    U64_MASK,
    EntryType,
    Feature,
    Features,
    Geometry,
    PageTableFormat,
    Prot,
    item_lg2sz,
    pgsz_lg2_to_level,
)
from .frames import FrameStore

_ZEROS = array("Q", bytes(4096))
_EMPTY, _TABLE, _OA = EntryType.EMPTY, EntryType.TABLE, EntryType.OA
_READ_OR_WRITE = int(Prot.READ | Prot.WRITE)


def compute_best_pgsize(bitmap: int, va: int, last_va: int, oa: int) -> int:
    """log2 of the largest size in ``bitmap`` that ``va`` and ``oa`` are both
    aligned to and that fits in ``[va, last_va]``; 0 when none does
    (``pt_compute_best_pgsize``)."""
    if va >= last_va:
        return 0
    length = last_va - va + 1
    m = va | oa | (1 << (length.bit_length() - 1))
    b = (m & -m).bit_length() - 1
    if b < 63:
        bitmap &= (1 << (b + 1)) - 1
    return bitmap.bit_length() - 1 if bitmap else 0


def pgsz_count(bitmap: int, va: int, last_va: int, oa: int, size_lg2: int) -> int:
    """How many leaves of ``2**size_lg2`` to place before the size must be
    chosen again: up to the next boundary of the next larger size, when both
    addresses could reach it aligned (``pt_pgsz_count``)."""
    length = last_va - va + 1
    larger = bitmap >> (size_lg2 + 1)
    if larger:
        nxt = size_lg2 + 1 + ((larger & -larger).bit_length() - 1)
        if (va ^ oa) & ((1 << nxt) - 1) == 0:
            length = min(length, (1 << nxt) - (va & ((1 << nxt) - 1)))
    return length >> size_lg2


@dataclass(frozen=True)
class PtInfo:
    """``get_info`` plus what a user wants to know about the geometry."""

    pgsize_bitmap: int
    top_level: int
    max_vasz_lg2: int
    max_oasz_lg2: int
    #: width the current top decodes (grows with a dynamic top)
    range_vasz_lg2: int
    sign_extend: bool


class _PartialMap(Exception):
    """An error after ``placed`` bytes of a map were installed."""

    def __init__(self, err: Exception, placed: int) -> None:
        super().__init__(str(err))
        self.err = err
        self.placed = placed


class PageTable:
    """One IOMMU page table (``struct pt_common`` plus its ops)."""

    def __init__(
        self,
        fmt: PageTableFormat,
        frames: FrameStore,
        *,
        top_phys: int,
        top_level: int,
        max_vasz_lg2: int,
        max_oasz_lg2: int,
        features: Features,
        pgsize_bitmap: int,
    ) -> None:
        self.fmt = fmt
        self.frames = frames
        self.top_phys = top_phys
        self.top_level = top_level
        self.max_vasz_lg2 = max_vasz_lg2
        self.max_oasz_lg2 = max_oasz_lg2
        self.features = features
        self.pgsize_bitmap = pgsize_bitmap
        #: called after the top changed (dynamic top growth)
        self.on_top_change: Callable[[], None] | None = None
        # (level, va >> span) -> table: saves re-walking for runs of maps; dropped whenever
        # a table leaves the tree
        self._table_cache: dict[tuple[int, int], int] = {}

    # -- construction -------------------------------------------------------------
    @classmethod
    def create(
        cls,
        fmt: PageTableFormat,
        frames: FrameStore,
        *,
        top_level: int | None = None,
        hw_max_vasz_lg2: int | None = None,
        hw_max_oasz_lg2: int | None = None,
        features: Features = frozenset(),
    ) -> PageTable:
        """Validate a configuration as ``pt_iommu_<fmt>_init`` does and allocate the top."""
        vasz = fmt.max_va_lg2 if hw_max_vasz_lg2 is None else hw_max_vasz_lg2
        oasz = fmt.max_oa_lg2 if hw_max_oasz_lg2 is None else hw_max_oasz_lg2
        if vasz <= 0 or vasz > fmt.max_va_lg2:
            raise InvalidArgument(f"{fmt.name}: VA size {vasz} bits is outside 1..{fmt.max_va_lg2}")
        if oasz <= 0 or oasz > fmt.max_oa_lg2:
            raise InvalidArgument(f"{fmt.name}: OA size {oasz} bits is outside 1..{fmt.max_oa_lg2}")
        unsupported = features - fmt.supported
        if unsupported:
            names = ", ".join(sorted(f.value for f in unsupported))
            raise NotSupported(f"{fmt.name} does not support feature(s) {names}")
        # Forced features are always on in the kernel; we add them rather than refuse.
        features = frozenset(features | fmt.forced)
        geo = fmt.geometry(top_level=top_level, hw_max_vasz_lg2=vasz, hw_max_oasz_lg2=oasz, features=features)
        if geo.top_level > fmt.max_top_level:
            raise InvalidArgument(f"{fmt.name}: top level {geo.top_level} > {fmt.max_top_level}")
        decodes = TABLE_ITEMS_LG2 + item_lg2sz(geo.top_level)
        if (
            Feature.DYNAMIC_TOP in features
            and Feature.DYNAMIC_TOP not in fmt.forced
            and (geo.top_level == fmt.max_top_level or decodes >= geo.max_vasz_lg2)
        ):
            features = features - {Feature.DYNAMIC_TOP}
        dynamic = fmt.effective(Feature.DYNAMIC_TOP, features)
        if not dynamic and geo.top_level < fmt.max_top_level and geo.max_vasz_lg2 > decodes:
            raise NotSupported(
                f"{fmt.name}: a level-{geo.top_level} top decodes {decodes} bits, not {geo.max_vasz_lg2}"
            )
        top_vasz = _range_vasz(fmt, geo.top_level, geo.max_vasz_lg2, dynamic)
        if top_vasz >= 64:
            features = features | {Feature.FULL_VA}
        if Feature.SIGN_EXTEND in features and (
            Feature.FULL_VA in features or fmt.effective(Feature.DYNAMIC_TOP, features)
        ):
            raise InvalidArgument(f"{fmt.name}: SIGN_EXTEND cannot be combined with FULL_VA or DYNAMIC_TOP")
        bitmap = format_pgsize_bitmap(fmt, geo, features)
        top = frames.alloc_table(geo.top_level)
        return cls(
            fmt,
            frames,
            top_phys=top,
            top_level=geo.top_level,
            max_vasz_lg2=geo.max_vasz_lg2,
            max_oasz_lg2=geo.max_oasz_lg2,
            features=features,
            pgsize_bitmap=bitmap,
        )

    # -- geometry ---------------------------------------------------------------
    @property
    def features(self) -> Features:
        return self._features

    @features.setter
    def features(self, features: Features) -> None:
        # derived once here: feature tests are on every map's path (restore trims features)
        self._features = features
        self.sign_extend = self.fmt.effective(Feature.SIGN_EXTEND, features)
        self.dynamic_top = self.fmt.effective(Feature.DYNAMIC_TOP, features)
        self._attrs: dict[int, int] = {}

    def _leaf_attrs(self, prot: int) -> int:
        attrs = self._attrs.get(prot)
        if attrs is None:
            attrs = self._attrs[prot] = self.fmt.leaf_attrs(prot, self._features)
        return attrs

    def range_vasz(self, top_level: int | None = None) -> int:
        """VA width decoded by a top at ``top_level`` (``_pt_top_range``)."""
        level = self.top_level if top_level is None else top_level
        return _range_vasz(self.fmt, level, self.max_vasz_lg2, self.dynamic_top)

    def top_range(self) -> tuple[int, int]:
        """``pt_top_range``: the lower half with sign extension, else everything."""
        v = self.range_vasz()
        if self.sign_extend:
            return 0, (1 << (v - 1)) - 1
        return 0, (1 << v) - 1 if v < 64 else U64_MASK

    def upper_range(self) -> tuple[int, int]:
        """``pt_upper_range``: the upper half with sign extension, else the top range."""
        if not self.sign_extend:
            return self.top_range()
        v = self.range_vasz()
        return (1 << 64) - (1 << (v - 1)), U64_MASK

    def check_range(self, va: int, last_va: int, vasz: int | None = None) -> bool:
        """``pt_check_range`` for ``[va, last_va]`` against a top decoding ``vasz`` bits."""
        v = self.range_vasz() if vasz is None else vasz
        if v >= 64:
            return True
        prefix = U64_MASK if self.sign_extend and (va >> (v - 1)) & 1 else 0
        return va >> v == prefix >> v and last_va >> v == prefix >> v

    def adopt(self, *, top_phys: int, top_level: int, max_vasz_lg2: int, features: Features) -> None:
        """Take over a table another kernel built (restore): its top, VA size and features.

        The page sizes follow the adopted geometry, as a fresh domain of it would report them
        (a riscv Sv39 table restored into a default Sv48 domain must not offer 512G pages).
        """
        self.top_phys, self.top_level = top_phys, top_level
        self.max_vasz_lg2 = max_vasz_lg2
        self.features = features
        geo = Geometry(top_level=top_level, max_vasz_lg2=max_vasz_lg2, max_oasz_lg2=self.max_oasz_lg2)
        self.pgsize_bitmap = format_pgsize_bitmap(self.fmt, geo, features)
        self._table_cache.clear()

    def top_items(self, vasz: int | None = None) -> int:
        v = self.range_vasz() if vasz is None else vasz
        return 1 << (v - item_lg2sz(self.top_level))

    def info(self) -> PtInfo:
        return PtInfo(
            pgsize_bitmap=self.pgsize_bitmap,
            top_level=self.top_level,
            max_vasz_lg2=self.max_vasz_lg2,
            max_oasz_lg2=self.max_oasz_lg2,
            range_vasz_lg2=self.range_vasz(),
            sign_extend=self.sign_extend,
        )

    def _index(self, va: int, level: int) -> int:
        if level == self.top_level:
            v = self.range_vasz()
            return (va & ((1 << v) - 1)) >> item_lg2sz(level) if v < 64 else va >> item_lg2sz(level)
        return (va >> item_lg2sz(level)) & (ITEMS_PER_TABLE - 1)

    # -- map ----------------------------------------------------------------------
    def map_range(
        self,
        iova: int,
        paddr: int,
        length: int,
        prot: int = Prot.READ | Prot.WRITE,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[tuple[int, int, int, int]]:
        """Map ``[iova, iova+length)`` to ``paddr`` (``iommu_map`` over ``map_range``).

        Returns what was installed as (iova, paddr, length, page size) segments;
        ``progress(done, length)`` is called with the bytes mapped after each table filled.
        On failure the part already installed is unmapped again, as the IOMMU
        core does; tables allocated on the way stay (the kernel keeps them too).
        """
        if not int(prot) & _READ_OR_WRITE:
            raise InvalidArgument(f"prot {prot:#x} has neither READ nor WRITE")
        if self.max_oasz_lg2 < 64 and paddr >> self.max_oasz_lg2:
            raise OutOfRange(f"paddr {paddr:#x} is above the {self.max_oasz_lg2}-bit output address limit")
        attrs = self._leaf_attrs(prot)
        if length <= 0:
            raise InvalidArgument("length must be positive")
        last = iova + length - 1
        if last > U64_MASK or iova < 0 or paddr < 0:
            raise Overflow(f"iova {iova:#x} + length {length:#x} wraps past 2^64")
        best = compute_best_pgsize(self.pgsize_bitmap, iova, last, paddr)
        if not best:
            raise NoSuchAddress(
                f"no page size in {self.pgsize_bitmap:#x} fits iova {iova:#x}, paddr {paddr:#x}, "
                f"length {length:#x} (all must be aligned to at least the smallest page)"
            )
        self._ensure_top(iova, last, pgsz_lg2_to_level(best))
        va, pa, mapped = iova, paddr, 0
        segments: list[tuple[int, int, int, int]] = []
        try:
            while va <= last:
                size = compute_best_pgsize(self.pgsize_bitmap, va, last, pa)
                if not size:
                    raise NoSuchAddress(f"the tail of the range at iova {va:#x} is not a whole page")
                n = pgsz_count(self.pgsize_bitmap, va, last, pa, size)
                tick = functools.partial(_ahead, progress, mapped, length) if progress else None
                try:
                    self._place(va, pa, size, n, attrs, tick)
                except _PartialMap as e:
                    mapped += e.placed
                    raise e.err from None
                step = n << size
                segments.append((va, pa, step, 1 << size))
                va, pa, mapped = va + step, pa + step, mapped + step
        except Exception:
            if mapped:
                self.unmap_range(iova, mapped)
            raise
        return segments

    def _ensure_top(self, va: int, last: int, leaf_level: int) -> None:
        """``check_map_range`` and, for a dynamic top, ``increase_top``."""
        level, top = self.top_level, self.top_phys
        new_tops: list[int] = []
        while not (self.check_range(va, last, self.range_vasz(level)) and leaf_level <= level):
            if not self.dynamic_top:
                raise OutOfRange(f"[{va:#x}, {last:#x}] is outside the table's {self._range_text()}")
            level += 1
            if level > self.fmt.max_top_level or item_lg2sz(level) >= self.max_vasz_lg2:
                self.frames.free_tables(new_tops)
                raise OutOfRange(f"[{va:#x}, {last:#x}] is beyond the {self.max_vasz_lg2}-bit VA space")
            try:
                new = self.frames.alloc_table(level)
            except Exception:
                self.frames.free_tables(new_tops)
                raise
            self.frames.write(new)[0] = self.fmt.encode_table(top, level, self.features)
            new_tops.append(new)
            top = new
        if new_tops:
            self.top_phys, self.top_level = top, level
            self._table_cache.clear()
            if self.on_top_change:
                self.on_top_change()

    def _range_text(self) -> str:
        lo, hi = self.top_range()
        text = f"range [{lo:#x}, {hi:#x}]"
        if self.sign_extend:
            ulo, uhi = self.upper_range()
            text += f" and [{ulo:#x}, {uhi:#x}]"
        return text

    def _table_at(self, va: int, level: int) -> int:
        """The table at ``level`` covering ``va``, allocating missing tables above it."""
        key = (level, va >> (item_lg2sz(level) + TABLE_ITEMS_LG2))
        cached = self._table_cache.get(key)
        if cached is not None:
            return cached
        fmt, feats = self.fmt, self.features
        table, lvl = self.top_phys, self.top_level
        while lvl > level:
            i = self._index(va, lvl)
            raw = self.frames.read(table)[i]
            d = fmt.decode(raw, lvl, feats)
            if d.type is _TABLE:
                table = d.addr
            elif d.type is _EMPTY:
                child = self.frames.alloc_table(lvl - 1)
                self.frames.write(table)[i] = fmt.encode_table(child, lvl, feats)
                table = child
            else:
                raise AddressInUse(f"iova {va:#x} is inside an existing {_size_text(lvl, d.contig_lg2)} mapping")
            lvl -= 1
        self._table_cache[key] = table
        return table

    def _place(
        self, va: int, pa: int, size_lg2: int, count: int, attrs: int, placed_bytes: Callable[[int], None] | None = None
    ) -> None:
        """Install ``count`` leaves of ``2**size_lg2`` from ``va``/``pa``, table by table."""
        fmt = self.fmt
        level = pgsz_lg2_to_level(size_lg2)
        if level > self.top_level:
            raise OutOfRange(f"a {1 << size_lg2:#x} page needs a level-{level} table above the top")
        step = 1 << (size_lg2 - item_lg2sz(level))
        size = 1 << size_lg2
        v0 = fmt.encode_leaf(pa, level, size_lg2, attrs)
        delta = fmt.encode_leaf(pa + size, level, size_lg2, attrs) - v0 if count > 1 else 0
        placed = 0
        while placed < count:
            try:
                table = self._table_at(va, level)
            except Exception as e:
                raise _PartialMap(e, placed << size_lg2) from None
            i0 = self._index(va, level)
            limit = self.top_items() if level == self.top_level else ITEMS_PER_TABLE
            k = min(count - placed, (limit - i0) // step)
            words = self.frames.write(table)
            first = v0 + placed * delta
            if any(words[i0 : i0 + k * step]):
                for j in range(k):
                    lo = i0 + j * step
                    try:
                        self._clear_for_leaf(words, lo, step, level)
                    except Exception as e:
                        raise _PartialMap(e, (placed + j) << size_lg2) from None
                    words[lo : lo + step] = array("Q", [first + j * delta]) * step
            elif step == 1:
                words[i0 : i0 + k] = array("Q", range(first, first + k * delta, delta) if delta else [first])
            else:
                words[i0 : i0 + k * step] = array(
                    "Q", [v for v in (first + j * delta for j in range(k)) for _ in range(step)]
                )
            placed += k
            va += k * size
            if placed_bytes is not None:
                placed_bytes(placed << size_lg2)

    def _clear_for_leaf(self, words: memoryview, lo: int, step: int, level: int) -> None:
        """Make room for one leaf: empty items are fine, a table without any
        mapping below it is freed, anything mapped is -EADDRINUSE."""
        for i in range(lo, lo + step):
            raw = words[i]
            if not raw:
                continue
            d = self.fmt.decode(raw, level, self.features)
            if d.type is _EMPTY:
                continue
            if d.type is _OA:
                raise AddressInUse(f"a {_size_text(level, d.contig_lg2)} mapping is already there")
            tables = [d.addr, *self._collect_below(d.addr, level - 1, check_mapped=True)]
            words[i] = 0
            self._table_cache.clear()
            self.frames.free_tables(tables)

    # -- unmap ----------------------------------------------------------------------
    def unmap_range(self, iova: int, length: int) -> int:
        """Unmap from ``iova``; returns the bytes unmapped (``iommu_unmap``).

        Whole entries only: a large page whose start is in the range goes
        entirely; the walk stops at the first hole; a table is freed only when
        the range covers its whole span.
        """
        if length <= 0 or iova < 0 or iova + length - 1 > U64_MASK:
            return 0
        last = iova + length - 1
        vasz = self.range_vasz()
        if not self.check_range(iova, last, vasz):
            return 0
        unmapped, _stopped = self._unmap(self.top_phys, self.top_level, iova, last, vasz)
        return unmapped

    def _unmap(self, table: int, level: int, va: int, last: int, vasz: int) -> tuple[int, bool]:
        """``vasz`` is ``range_vasz()``, computed once per unmap for the top's index and size."""
        fmt, feats = self.fmt, self.features
        item = item_lg2sz(level)
        words = self.frames.read(table)
        wr: memoryview | None = None
        if level == self.top_level:  # _index() and top_items() with vasz
            i = (va & ((1 << vasz) - 1) if vasz < 64 else va) >> item
            limit = 1 << (vasz - item)
        else:
            i = (va >> item) & (ITEMS_PER_TABLE - 1)
            limit = ITEMS_PER_TABLE
        item_va = va >> item << item
        total, first = 0, True
        while i < limit and item_va <= last:
            d = fmt.decode(words[i], level, feats)
            if d.type is _EMPTY:
                return total, True
            if wr is None:
                wr = self.frames.write(table)
            if d.type is _OA:
                n = 1 << d.contig_lg2
                entry = 1 << (item + d.contig_lg2)
                if first and va & (entry - 1):
                    return total, True  # starts inside a large page: never split
                start = i & ~(n - 1)
                wr[start : start + n] = _ZEROS[:n]
                total += entry
                i = start + n
                item_va = (item_va & ~(entry - 1)) + entry
            else:
                span_last = item_va + (1 << item) - 1
                covered = item_va >= va and span_last <= last
                sub, stopped = self._unmap(d.addr, level - 1, max(va, item_va), min(last, span_last), vasz)
                total += sub
                if stopped:
                    return total, True
                if covered:
                    wr[i] = 0
                    self._table_cache.clear()
                    self.frames.free_tables([d.addr])
                i += 1
                item_va += 1 << item
            first = False
        return total, False

    # -- lookup -----------------------------------------------------------------------
    def iova_to_phys(self, iova: int) -> int:
        """The physical address ``iova`` translates to, 0 for a hole.

        Deviation: for an address outside the table the kernel returns the
        negative errno cast to an address; we raise OutOfRange.
        """
        vasz = self.range_vasz()
        if not 0 <= iova <= U64_MASK or not self.check_range(iova, iova, vasz):
            raise OutOfRange(f"iova {iova:#x} is outside the table's {self._range_text()}")
        decode, read, feats = self.fmt.decode, self.frames.read, self.features
        table, level = self.top_phys, self.top_level
        isz = item_lg2sz(level)
        # the top index as _index() computes it, then (va >> isz) mod 512 below
        i = (iova & ((1 << vasz) - 1) if vasz < 64 else iova) >> isz
        while True:
            d = decode(read(table)[i], level, feats)
            if d.type is _EMPTY:
                return 0
            if d.type is _TABLE:
                table, level, isz = d.addr, level - 1, isz - TABLE_ITEMS_LG2
                i = (iova >> isz) & (ITEMS_PER_TABLE - 1)
                continue
            size = 1 << (isz + d.contig_lg2)
            return d.addr | (iova & (size - 1))

    # -- collect / free -------------------------------------------------------------------
    def collect_tables(self) -> list[int]:
        """Every table reachable from the top, top first, pre-order by ascending
        index over both halves (``pt_all_range`` + ``__collect_tables``)."""
        return [self.top_phys, *self._collect_below(self.top_phys, self.top_level, top=True)]

    def _collect_below(self, table: int, level: int, *, check_mapped: bool = False, top: bool = False) -> list[int]:
        out: list[int] = []
        seen = {table}
        fmt, feats = self.fmt, self.features

        def walk(tbl: int, lvl: int, n: int) -> None:
            if lvl == 0 and not check_mapped:
                return  # level 0 cannot hold tables
            children = []
            for raw in self.frames.read(tbl)[:n]:
                if not raw:
                    continue
                d = fmt.decode(raw, lvl, feats)
                if d.type is _TABLE:
                    if d.addr in seen:
                        raise BadData(f"table {d.addr:#x} is reachable twice (cycle or shared table)")
                    seen.add(d.addr)
                    children.append(d.addr)
                elif d.type is _OA and check_mapped:
                    raise AddressInUse(f"the table being replaced still maps a {_size_text(lvl, d.contig_lg2)} page")
            if lvl > 1 or check_mapped:
                self.frames.prefetch(children)  # the children are read next, one table each
            for child in children:
                out.append(child)
                walk(child, lvl - 1, ITEMS_PER_TABLE)

        walk(table, level, self.top_items() if top else ITEMS_PER_TABLE)
        return out

    def free(self) -> int:
        """Release every table (``deinit``); returns how many frames were freed."""
        tables = self.collect_tables()
        self.frames.free_tables(tables)
        self._table_cache.clear()
        return len(tables)


def _ahead(progress: Callable[[int, int], None], before: int, total: int, placed: int) -> None:
    """``progress`` for a segment that starts ``before`` bytes into a map of ``total``."""
    progress(before + placed, total)


def range_vasz(fmt: PageTableFormat, top_level: int, max_vasz: int, features: Features) -> int:
    """The VA width a top at ``top_level`` decodes (``_pt_top_range``)."""
    return _range_vasz(fmt, top_level, max_vasz, fmt.effective(Feature.DYNAMIC_TOP, features))


def _range_vasz(fmt: PageTableFormat, top_level: int, max_vasz: int, dynamic: bool) -> int:
    if dynamic and top_level != fmt.max_top_level:
        return min(max_vasz, TABLE_ITEMS_LG2 + item_lg2sz(top_level))
    return max_vasz


def _size_text(level: int, contig_lg2: int) -> str:
    size = 1 << (item_lg2sz(level) + contig_lg2)
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift:
            return f"{size >> shift}{unit}"
    return f"{size}B"


__all__ = ["Geometry", "PageTable", "PtInfo", "compute_best_pgsize", "pgsz_count", "range_vasz"]
