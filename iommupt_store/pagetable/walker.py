"""The hardware walker: what the IOMMU sees when a device does DMA.

It translates by reading raw frame bytes only (given as a mapping from
physical address to 4 KiB contents) and decoding them with the format; it
shares no state with the engine. It faults the way hardware would (reporting
the level of the faulting table) and, unlike hardware, also reports tables
that are not frames of the domain and tables reachable twice (cycles or
sharing).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from ..errors import BadData
from ..formats.base import ITEMS_PER_TABLE, U64_MASK, EntryType, Feature, PageTableFormat, item_lg2sz

_ITEMS = struct.Struct(f"<{ITEMS_PER_TABLE}Q")
#: decoded tables kept for repeated translations; a whole-tree walk visits each table once
_DECODED_MAX = 1024


@dataclass(frozen=True)
class Translation:
    """The result of one walk. ``phys`` is None when the walk faulted."""

    iova: int
    phys: int | None
    page_size: int = 0
    #: the leaf's level, or the level of the table whose entry faulted
    level: int = 0
    fault: str | None = None
    #: the raw leaf entry that translated it (0 after a fault)
    entry: int = 0


class Leaf(NamedTuple):
    iova: int
    phys: int
    size: int
    level: int


@dataclass
class TableInfo:
    phys: int
    level: int
    #: the first IOVA this table translates
    iova: int
    used: int = 0
    #: leaf count by page size
    leaves: dict[int, int] = field(default_factory=dict)
    children: list[TableInfo] = field(default_factory=list)


class WalkError(BadData):
    """The table structure itself is broken (cycle, foreign page, bad size): bad stored data."""


class HardwareWalker:
    """Walks one domain's frames from its top, as the IOMMU would."""

    def __init__(
        self,
        fmt: PageTableFormat,
        frames: Mapping[int, bytes],
        *,
        top_phys: int,
        top_level: int,
        vasz: int,
        sign_extend: bool,
    ) -> None:
        self.fmt = fmt
        self.frames = frames
        self.top_phys = top_phys
        self.top_level = top_level
        self.vasz = vasz
        self.sign_extend = sign_extend
        self._decoded: dict[int, tuple[int, ...]] = {}

    def _items(self, phys: int) -> tuple[int, ...]:
        items = self._decoded.get(phys)
        if items is None:
            data = self.frames.get(phys)
            if data is None:
                raise WalkError(f"table pointer to {phys:#x}, which is not a frame of this domain")
            if len(data) != 4096:
                raise WalkError(f"frame {phys:#x} is {len(data)} bytes, not 4096")
            items = _ITEMS.unpack(data)
            if len(self._decoded) >= _DECODED_MAX:
                self._decoded.clear()
            self._decoded[phys] = items
        return items

    def _prefetch_children(self, items: tuple[int, ...], level: int, n: int) -> None:
        """Tell frames that fetch lazily (``prefetch``) which tables the walk reads next."""
        prefetch = getattr(self.frames, "prefetch", None)
        if prefetch is None or level == 0:
            return
        decode, empty = self.fmt.decode, frozenset[Feature]()
        decoded = (decode(raw, level, empty) for raw in items[:n] if raw)
        children = [d.addr for d in decoded if d.type is EntryType.TABLE]
        if children:
            prefetch(children)

    def canonical(self, iova: int) -> bool:
        if self.vasz >= 64:
            return 0 <= iova <= U64_MASK
        high = iova >> self.vasz
        if self.sign_extend and (iova >> (self.vasz - 1)) & 1:
            return high == U64_MASK >> self.vasz
        return high == 0

    def _index(self, iova: int, level: int) -> int:
        if level == self.top_level:
            return (iova & ((1 << self.vasz) - 1) if self.vasz < 64 else iova) >> item_lg2sz(level)
        return (iova >> item_lg2sz(level)) & (ITEMS_PER_TABLE - 1)

    def translate(self, iova: int) -> Translation:
        if not self.canonical(iova):
            return Translation(iova, None, level=self.top_level, fault="non-canonical or out-of-range iova")
        table, level, path = self.top_phys, self.top_level, {self.top_phys}
        while True:
            raw = self._items(table)[self._index(iova, level)]
            d = self.fmt.decode(raw, level, frozenset())
            if d.type is EntryType.EMPTY:
                return Translation(iova, None, level=level, fault="not present")
            if d.type is EntryType.OA:
                size = 1 << (item_lg2sz(level) + d.contig_lg2)
                return Translation(iova, d.addr | (iova & (size - 1)), size, level, entry=raw)
            if level == 0 or d.addr in path:
                raise WalkError(f"entry at level {level} of table {table:#x} points back to {d.addr:#x}")
            path.add(d.addr)
            table, level = d.addr, level - 1

    def _top_base(self, index: int) -> int:
        """The IOVA of top-table item ``index`` (sign-extended in the upper half)."""
        va = index << item_lg2sz(self.top_level)
        if self.sign_extend and self.vasz < 64 and (va >> (self.vasz - 1)) & 1:
            va |= U64_MASK ^ ((1 << self.vasz) - 1)
        return va

    def tables(self) -> TableInfo:
        """The whole tree, each table visited once (a second visit is a WalkError)."""
        seen: set[int] = set()

        def visit(phys: int, level: int, base: int, n: int, top: bool) -> TableInfo:
            if phys in seen:
                raise WalkError(f"table {phys:#x} is reachable twice (cycle or shared table)")
            seen.add(phys)
            info = TableInfo(phys, level, base)
            items = self._items(phys)
            self._prefetch_children(items, level, n)
            item = item_lg2sz(level)
            i = 0
            while i < n:
                raw = items[i]
                d = self.fmt.decode(raw, level, frozenset())
                if d.type is EntryType.EMPTY:
                    i += 1
                    continue
                va = self._top_base(i) if top else base + (i << item)
                if d.type is EntryType.OA:
                    step = 1 << d.contig_lg2
                    size = 1 << (item + d.contig_lg2)
                    info.used += step
                    info.leaves[size] = info.leaves.get(size, 0) + 1
                    i = (i & ~(step - 1)) + step
                    continue
                if level == 0:
                    raise WalkError(f"level-0 table {phys:#x} holds a table pointer at index {i}")
                info.used += 1
                info.children.append(visit(d.addr, level - 1, va, ITEMS_PER_TABLE, False))
                i += 1
            return info

        n = 1 << (self.vasz - item_lg2sz(self.top_level))
        return visit(self.top_phys, self.top_level, 0, min(n, ITEMS_PER_TABLE), True)

    def leaves(self) -> list[Leaf]:
        """Every mapping, in ascending index order from the top (lower half first)."""
        return [Leaf(iova, phys, size, level) for iova, phys, size, level, _raw in self.leaf_entries()]

    def leaf_entries(self) -> list[tuple[int, int, int, int, int]]:
        """Every mapping as (iova, phys, size, level, raw entry), in the order of ``leaves``."""
        return list(self.iter_leaf_entries())

    def iter_leaf_entries(self) -> Iterator[tuple[int, int, int, int, int]]:
        """``leaf_entries`` one at a time (ascending IOVA): a whole domain without a list of it."""
        seen: set[int] = set()
        decode, empty = self.fmt.decode, frozenset[Feature]()
        oa_type = EntryType.OA

        def visit(phys: int, level: int, base: int, n: int, top: bool) -> Iterator[tuple[int, int, int, int, int]]:
            if phys in seen:
                raise WalkError(f"table {phys:#x} is reachable twice (cycle or shared table)")
            seen.add(phys)
            items = self._items(phys)
            self._prefetch_children(items, level, n)
            item = item_lg2sz(level)
            i = 0
            while i < n:
                raw = items[i]
                if not raw:
                    i += 1
                    continue
                d = decode(raw, level, empty)
                if d.type is oa_type:
                    va = self._top_base(i) if top else base + (i << item)
                    step = 1 << d.contig_lg2
                    size = 1 << (item + d.contig_lg2)
                    yield (va & ~(size - 1), d.addr, size, level, raw)
                    i = (i & ~(step - 1)) + step
                    continue
                if d.type is EntryType.TABLE:
                    if level == 0:
                        raise WalkError(f"level-0 table {phys:#x} holds a table pointer at index {i}")
                    va = self._top_base(i) if top else base + (i << item)
                    yield from visit(d.addr, level - 1, va, ITEMS_PER_TABLE, False)
                i += 1

        n = 1 << (self.vasz - item_lg2sz(self.top_level))
        yield from visit(self.top_phys, self.top_level, 0, min(n, ITEMS_PER_TABLE), True)
