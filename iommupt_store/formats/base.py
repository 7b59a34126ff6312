"""The contract every page-table format implements.

A format is pure: constants, entry encode/decode and its configuration rules.
It does no I/O and keeps no state; the generic engine (``pagetable.engine``)
and the hardware walker (``pagetable.walker``) are written only against this
interface, so adding a format means adding a module and registering it.

Conventions (the kernel's): level 0 holds the smallest leaves; the item size at
level L is ``2**(12 + 9*L)``; every table is one 4 KiB frame of 512
little-endian u64 items; sizes are passed as log2 ("lg2").
"""

from __future__ import annotations

import enum
import functools
import sys
from abc import ABC, abstractmethod
from array import array
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from ..errors import InvalidArgument, NotSupported

GRANULE_LG2 = 12
TABLE_ITEMS_LG2 = 9
ITEMS_PER_TABLE = 1 << TABLE_ITEMS_LG2
U64_MASK = (1 << 64) - 1


class Prot(enum.IntFlag):
    """Mapping permissions as include/linux/iommu.h numbers them."""

    READ = 1
    WRITE = 2
    CACHE = 4
    NOEXEC = 8
    MMIO = 16
    PRIV = 32


class EntryType(enum.IntEnum):
    """What one loaded item is (``enum pt_entry_type``)."""

    EMPTY = 0
    TABLE = 1
    OA = 2


class Feature(enum.Enum):
    """``enum pt_features`` by name.

    Stored by name, never by bit number: the kernel renumbers the format bits
    between versions (PT_FEAT_DETAILED_GATHER moved PT_FEAT_FMT_START).
    """

    DMA_INCOHERENT = "DMA_INCOHERENT"
    FULL_VA = "FULL_VA"
    DYNAMIC_TOP = "DYNAMIC_TOP"
    SIGN_EXTEND = "SIGN_EXTEND"
    FLUSH_RANGE = "FLUSH_RANGE"
    FLUSH_RANGE_NO_GAPS = "FLUSH_RANGE_NO_GAPS"
    AMDV1_ENCRYPT_TABLES = "AMDV1_ENCRYPT_TABLES"
    AMDV1_FORCE_COHERENCE = "AMDV1_FORCE_COHERENCE"
    VTDSS_FORCE_COHERENCE = "VTDSS_FORCE_COHERENCE"
    VTDSS_FORCE_WRITEABLE = "VTDSS_FORCE_WRITEABLE"
    X86_64_AMD_ENCRYPT_TABLES = "X86_64_AMD_ENCRYPT_TABLES"
    RISCV_SVNAPOT_64K = "RISCV_SVNAPOT_64K"
    RISCV_SVPBMT = "RISCV_SVPBMT"


Features = frozenset[Feature]


class Decoded(NamedTuple):
    """One decoded item (a tuple: cheap to create on hot paths).

    ``addr`` is the child table's physical address for TABLE, the output
    address of the *whole entry* (start of a contiguous block) for OA, and 0
    for EMPTY. ``contig_lg2`` is log2 of the number of items forming the entry
    (0 for a single item).
    """

    type: EntryType
    addr: int = 0
    contig_lg2: int = 0


EMPTY = Decoded(EntryType.EMPTY)


class FrameRun(NamedTuple):
    """A stretch of one frame's items, as ``PageTableFormat.scan_frame`` finds it.

    A table pointer is one item (``entries`` 1, ``entry_size`` 0). Leaves are
    ``entries`` leaf entries of ``entry_size`` bytes each, covering ``items``
    items from ``index``, whose output addresses follow on from ``addr`` and
    whose non-address bits are those of ``raw`` (the first item).
    """

    first: int
    items: int
    table: bool
    addr: int
    entry_size: int
    entries: int
    raw: int


@dataclass(frozen=True)
class Geometry:
    """What a format's init decides for one domain (``fmt_init``)."""

    top_level: int
    max_vasz_lg2: int
    max_oasz_lg2: int


@functools.lru_cache(maxsize=1024)
def _ramp(count: int, step: int) -> tuple[int, int]:
    """``count`` little-endian u64 lanes as one integer: a 1 in every lane, and ``j * step`` in lane j."""
    ones = ((1 << (64 * count)) - 1) // U64_MASK
    return ones, sum((j * step) << (64 * j) for j in range(count))


def _is_ramp(lanes: memoryview, first: int, step: int) -> bool:
    """Whether the u64 items in ``lanes`` are ``first``, ``first + step``, ... (none overflowing)."""
    ones, ramp = _ramp(len(lanes) // 8, step)
    return int.from_bytes(lanes, "little") == first * ones + ramp


def item_lg2sz(level: int) -> int:
    """log2 of the size one item covers at ``level``."""
    return GRANULE_LG2 + TABLE_ITEMS_LG2 * level


def pgsz_lg2_to_level(size_lg2: int) -> int:
    """The level whose items hold a leaf of ``2**size_lg2`` (contiguous or not)."""
    return (size_lg2 - GRANULE_LG2) // TABLE_ITEMS_LG2


class PageTableFormat(ABC):
    """One hardware page-table format. Subclasses are stateless singletons."""

    name: ClassVar[str]
    max_va_lg2: ClassVar[int]
    max_oa_lg2: ClassVar[int]
    max_top_level: ClassVar[int]
    #: features the format can be asked for (production set, ``PT_SUPPORTED_FEATURES``)
    supported: ClassVar[Features]
    #: features always on whatever the runtime bits say (``PT_FORCE_ENABLED_FEATURES``)
    forced: ClassVar[Features] = frozenset()
    #: the highest software bit index, or None when the format has none
    max_sw_bit: ClassVar[int | None] = None
    #: True when the format has hardware dirty bits (amdv1, vtdss)
    has_dirty: ClassVar[bool] = False
    #: the hardware dirty bit of a leaf (0 without dirty tracking)
    dirty_bit: ClassVar[int] = 0
    #: the descriptor bits ``attrs_from_entry`` keeps
    attr_mask: ClassVar[int]
    #: the entry bits that hold the output address (of a single-item leaf)
    oa_mask: ClassVar[int]
    #: where bit 12 of an output address sits in an entry (the address field's shift)
    oa_raw_shift: ClassVar[int] = GRANULE_LG2

    # -- configuration -------------------------------------------------------
    @abstractmethod
    def geometry(
        self,
        *,
        top_level: int | None,
        hw_max_vasz_lg2: int,
        hw_max_oasz_lg2: int,
        features: Features,
    ) -> Geometry:
        """The format's ``fmt_init``: pick the top level and clamp VA/OA sizes.

        ``top_level`` is the format's own knob (amdv1 ``starting_level``,
        x86_64/vtdss ``top_level``; riscv derives it from the VA size and
        ignores it). Raises the kernel's errors (``InvalidArgument``,
        ``NotSupported``) for a configuration the format refuses.
        """

    # -- geometry ------------------------------------------------------------
    @abstractmethod
    def can_hold_leaf(self, level: int) -> bool:
        """Whether an item at ``level`` may be a leaf."""

    def possible_sizes(self, level: int, *, features: Features = frozenset()) -> int:
        """Bitmap (bit n set = 2**n bytes) of leaf sizes installable at ``level``.

        The default is one item, at the levels that hold leaves; formats with
        contiguous entries add their sizes.
        """
        return 1 << item_lg2sz(level) if self.can_hold_leaf(level) else 0

    def can_hold_table(self, level: int) -> bool:
        """Whether an item at ``level`` may point to a lower table."""
        return level > 0

    # -- entries -------------------------------------------------------------
    @abstractmethod
    def decode(self, raw: int, level: int, features: Features) -> Decoded:
        """Classify one raw item at ``level`` (``pt_load_entry_raw``)."""

    @abstractmethod
    def leaf_attrs(self, prot: int, features: Features) -> int:
        """The descriptor bits for a leaf with ``prot`` (``set_prot``).

        Raises the kernel's error when the format refuses ``prot``.
        """

    @abstractmethod
    def encode_leaf(self, oa: int, level: int, size_lg2: int, attrs: int) -> int:
        """The u64 written into *each* item of a leaf of ``2**size_lg2`` at ``oa``."""

    @abstractmethod
    def encode_table(self, child_phys: int, level: int, features: Features) -> int:
        """The u64 of an item at ``level`` pointing to the table at ``child_phys``."""

    def attrs_from_entry(self, raw: int, level: int) -> int:
        """Recover the descriptor bits ``leaf_attrs`` produced (``attr_from_entry``)."""
        return raw & self.attr_mask

    # -- whole frames -----------------------------------------------------------
    def scan_frame(self, data: bytes, level: int, n: int = ITEMS_PER_TABLE) -> list[FrameRun]:
        """The first ``n`` items of the table ``data`` (4 KiB) at ``level`` as the hardware reads
        them: table pointers one by one and leaves joined into maximal runs (``FrameRun``), in
        index order.

        Built on ``decode`` (the entry bits alone decide, as in the walker), with one shortcut:
        single-item leaves whose entries differ only by an address that grows one item at a time
        are recognised with one comparison of the whole stretch as a big integer, so a full
        table of 4 KiB pages costs a few integer operations rather than 512 decodes.
        """
        items = array("Q")
        items.frombytes(data)
        if sys.byteorder != "little":
            items.byteswap()
        out: list[FrameRun] = []
        decode, empty = self.decode, frozenset[Feature]()
        isz = item_lg2sz(level)
        step = 1 << (isz - GRANULE_LG2 + self.oa_raw_shift)
        oa_mask = self.oa_mask
        view = memoryview(data)
        i = 0
        while i < n:
            raw = items[i]
            if not raw:
                i += 1
                continue
            d = decode(raw, level, empty)
            if d.type is EntryType.EMPTY:
                i += 1
                continue
            if d.type is EntryType.TABLE:
                out.append(FrameRun(i, 1, True, d.addr, 0, 1, raw))
                i += 1
                continue
            if d.contig_lg2:
                i = self._contig_run(items, level, i, n, d, raw, out)
                continue
            # Single-item leaves: how many more could follow before the address field overflows
            # (none when the decoded address is not the field itself, e.g. a malformed amdv1 item).
            room = min(n - i, ((oa_mask - (raw & oa_mask)) // step) + 1)
            if ((raw & oa_mask) >> self.oa_raw_shift) << GRANULE_LG2 != d.addr:
                room = 1
            end = i + room
            if room > 1 and items[end - 1] == raw + (room - 1) * step and _is_ramp(view[8 * i : 8 * end], raw, step):
                j = end
            else:
                j, nxt = i + 1, raw + step
                while j < end and items[j] == nxt:
                    j += 1
                    nxt += step
            out.append(FrameRun(i, j - i, False, d.addr, 1 << isz, j - i, raw))
            i = j
        return out

    def _contig_run(
        self, items: array[int], level: int, i: int, n: int, d: Decoded, raw: int, out: list[FrameRun]
    ) -> int:
        """Contiguous leaves (one entry over 2**contig_lg2 items) from item ``i``, joined while each
        next entry continues the last; returns the index after them."""
        span = 1 << d.contig_lg2
        size = 1 << (item_lg2sz(level) + d.contig_lg2)
        start = i & ~(span - 1)
        attrs = raw & ~self.oa_mask
        addr, entries, j = d.addr, 1, start + span
        while j < n:
            nxt = items[j]
            if nxt & ~self.oa_mask != attrs:
                break
            e = self.decode(nxt, level, frozenset())
            if e.type is not EntryType.OA or e.contig_lg2 != d.contig_lg2 or e.addr != addr + entries * size:
                break
            entries += 1
            j += span
        out.append(FrameRun(start, j - start, False, addr, size, entries, raw))
        return j

    # -- dirty tracking (one item; the caller covers every item of an entry) ---
    def is_dirty(self, raw: int) -> bool:
        return bool(raw & self.dirty_bit)

    def make_clean(self, raw: int) -> int:
        return raw & ~self.dirty_bit & U64_MASK

    def make_dirty(self, raw: int) -> int:
        return raw | self.dirty_bit

    def radix_geometry(
        self, levels: range, top_level: int | None, hw_max_vasz_lg2: int, hw_max_oasz_lg2: int
    ) -> Geometry:
        """``fmt_init`` of a format whose top level is a knob (x86_64, vtdss):
        without one, the smallest top that decodes the VA; the VA must fit the top."""
        if not 0 < hw_max_vasz_lg2 <= self.max_va_lg2 or hw_max_oasz_lg2 <= 0:
            raise InvalidArgument(f"{self.name}: bad hw sizes va={hw_max_vasz_lg2} oa={hw_max_oasz_lg2}")
        if top_level is None:
            fits = [lvl for lvl in levels if hw_max_vasz_lg2 <= TABLE_ITEMS_LG2 + item_lg2sz(lvl)]
            top_level = fits[0] if fits else levels[-1]
        if top_level not in levels:
            raise NotSupported(f"{self.name}: top_level must be {levels[0]}..{levels[-1]}, got {top_level}")
        if hw_max_vasz_lg2 > TABLE_ITEMS_LG2 + item_lg2sz(top_level):
            raise NotSupported(f"{self.name}: {hw_max_vasz_lg2}-bit VA does not fit top level {top_level}")
        return Geometry(
            top_level=top_level,
            max_vasz_lg2=hw_max_vasz_lg2,
            max_oasz_lg2=min(self.max_oa_lg2, hw_max_oasz_lg2),
        )

    # -- helpers derived from the above ---------------------------------------
    def effective(self, feature: Feature, features: Features) -> bool:
        """``pt_feature``: forced wins, unsupported loses, else the runtime bit."""
        if feature in self.forced:
            return True
        return feature in features and feature in self.supported
