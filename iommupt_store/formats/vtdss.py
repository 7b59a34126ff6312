"""Intel VT-d second-stage page table (kernel ``fmt/vtdss.h``).

There is no present bit: an item is empty exactly when it is zero, which is
why a leaf must carry at least one of R/W.
"""

from __future__ import annotations

from typing import ClassVar

from iommupt_store.errors import InvalidArgument
from iommupt_store.formats.base import (
    EMPTY,
    GRANULE_LG2,
    U64_MASK,
    Decoded,
    EntryType,
    Feature,
    Features,
    Geometry,
    PageTableFormat,
    Prot,
    item_lg2sz,
)

R = 1 << 0
W = 1 << 1
PS = 1 << 7
A = 1 << 8
D = 1 << 9
SNP = 1 << 11
ADDR_MASK = ((1 << 52) - 1) & ~((1 << GRANULE_LG2) - 1)  # bits 51..12

#: descriptor bits ``attr_from_entry`` keeps
ATTR_MASK = R | W | SNP

#: the software bit the incoherent-DMA code sets on flushed table pointers
SW_BIT_CACHE_FLUSH_DONE = 0


class VtdssFormat(PageTableFormat):
    name: ClassVar[str] = "vtdss"
    max_va_lg2: ClassVar[int] = 57
    max_oa_lg2: ClassVar[int] = 52
    max_top_level: ClassVar[int] = 4
    supported: ClassVar[Features] = frozenset(
        {
            Feature.FLUSH_RANGE,
            Feature.VTDSS_FORCE_COHERENCE,
            Feature.VTDSS_FORCE_WRITEABLE,
            Feature.DMA_INCOHERENT,
        }
    )
    forced: ClassVar[Features] = frozenset()
    max_sw_bit: ClassVar[int | None] = 10
    has_dirty: ClassVar[bool] = True
    dirty_bit: ClassVar[int] = D
    attr_mask: ClassVar[int] = ATTR_MASK
    oa_mask: ClassVar[int] = ADDR_MASK

    # -- configuration -------------------------------------------------------
    def geometry(
        self,
        *,
        top_level: int | None,
        hw_max_vasz_lg2: int,
        hw_max_oasz_lg2: int,
        features: Features,
    ) -> Geometry:
        return self.radix_geometry(range(2, 5), top_level, hw_max_vasz_lg2, hw_max_oasz_lg2)

    # -- geometry ------------------------------------------------------------
    def can_hold_leaf(self, level: int) -> bool:
        return 0 <= level <= 2

    def can_hold_table(self, level: int) -> bool:
        return 0 < level <= self.max_top_level

    def sw_bit(self, bitnr: int) -> int:
        """The mask of software (HW-ignored) bit ``bitnr`` (0..10)."""
        if bitnr == 0:
            return 1 << 10
        if 1 <= bitnr <= 9:
            return 1 << (bitnr - 1 + 52)
        if bitnr == 10:
            return 1 << 63
        raise InvalidArgument(f"vtdss: no software bit {bitnr}")

    # -- entries -------------------------------------------------------------
    def decode(self, raw: int, level: int, features: Features) -> Decoded:
        if raw == 0:
            return EMPTY
        addr = raw & ADDR_MASK
        if level == 0 or (self.can_hold_leaf(level) and raw & PS):
            return Decoded(EntryType.OA, addr)
        return Decoded(EntryType.TABLE, addr)

    def leaf_attrs(self, prot: int, features: Features) -> int:
        # Without R or W the leaf would read back as empty.
        if not prot & (Prot.READ | Prot.WRITE):
            raise InvalidArgument("vtdss: a mapping needs READ or WRITE")
        bits = 0
        if prot & Prot.READ:
            bits |= R
        if prot & Prot.WRITE:
            bits |= W
        if self.effective(Feature.VTDSS_FORCE_COHERENCE, features):
            bits |= SNP
        if self.effective(Feature.VTDSS_FORCE_WRITEABLE, features) and not prot & Prot.WRITE:
            # ERRATA_772415_SPR17: nesting parents must not hold read-only leaves.
            raise InvalidArgument("vtdss: read-only mapping refused (FORCE_WRITEABLE)")
        return bits

    def encode_leaf(self, oa: int, level: int, size_lg2: int, attrs: int) -> int:
        if not self.can_hold_leaf(level) or size_lg2 != item_lg2sz(level):
            raise InvalidArgument(f"vtdss: no 2^{size_lg2} leaf at level {level}")
        if oa < 0 or oa % (1 << size_lg2) or oa >> self.max_oa_lg2:
            raise InvalidArgument(f"vtdss: bad leaf OA {oa:#x} for size 2^{size_lg2}")
        value = oa | attrs
        if level != 0:
            value |= PS
        return value & U64_MASK

    def encode_table(self, child_phys: int, level: int, features: Features) -> int:
        if not self.can_hold_table(level):
            raise InvalidArgument(f"vtdss: level {level} cannot point to a table")
        if child_phys < 0 or child_phys % (1 << GRANULE_LG2) or child_phys >> self.max_oa_lg2:
            raise InvalidArgument(f"vtdss: bad table address {child_phys:#x}")
        value = R | W | child_phys
        # Incoherent walkers: pointers are marked once the item was flushed.
        if self.effective(Feature.DMA_INCOHERENT, features):
            value |= self.sw_bit(SW_BIT_CACHE_FLUSH_DONE)
        return value


VTDSS = VtdssFormat()
