"""x86 4/5-level page table (kernel ``fmt/x86_64.h``).

Used by Intel first-stage and AMD v2 (guest) translation. Leaves are 4K, 2M
or 1G (PS marks the big ones); there are no contiguous entries.
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

P = 1 << 0
RW = 1 << 1
U = 1 << 2
A = 1 << 5
D = 1 << 6
PS = 1 << 7
XD = 1 << 63
ADDR_MASK = ((1 << 52) - 1) & ~((1 << GRANULE_LG2) - 1)  # bits 51..12

#: descriptor bits ``attr_from_entry`` keeps
ATTR_MASK = RW | U | A | D | XD

#: the software bit the incoherent-DMA code sets on flushed table pointers
SW_BIT_CACHE_FLUSH_DONE = 0


class X86_64Format(PageTableFormat):
    name: ClassVar[str] = "x86_64"
    max_va_lg2: ClassVar[int] = 57
    max_oa_lg2: ClassVar[int] = 52
    max_top_level: ClassVar[int] = 4
    # Linux 7.3 builds DMA_INCOHERENT into production (Intel first stage behind an IOMMU that does not
    # snoop, as QEMU's); the seed's era had it in debug builds only.
    supported: ClassVar[Features] = frozenset(
        {
            Feature.SIGN_EXTEND,
            Feature.FLUSH_RANGE,
            Feature.FLUSH_RANGE_NO_GAPS,
            Feature.X86_64_AMD_ENCRYPT_TABLES,
            Feature.DMA_INCOHERENT,
        }
    )
    forced: ClassVar[Features] = frozenset()
    max_sw_bit: ClassVar[int | None] = 12
    has_dirty: ClassVar[bool] = False
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
        return self.radix_geometry(range(3, 5), top_level, hw_max_vasz_lg2, hw_max_oasz_lg2)

    # -- geometry ------------------------------------------------------------
    def can_hold_leaf(self, level: int) -> bool:
        return 0 <= level <= 2

    def can_hold_table(self, level: int) -> bool:
        return 0 < level <= self.max_top_level

    def sw_bit(self, bitnr: int) -> int:
        """The mask of software (HW-ignored) bit ``bitnr`` (0..12)."""
        if bitnr == 0:
            return 1 << 9
        if bitnr == 1:
            return 1 << 11
        if 2 <= bitnr <= 12:
            return 1 << (bitnr - 2 + 52)
        raise InvalidArgument(f"x86_64: no software bit {bitnr}")

    # -- entries -------------------------------------------------------------
    def decode(self, raw: int, level: int, features: Features) -> Decoded:
        if not raw & P:
            return EMPTY
        # The SME C-bit is modelled as inactive (mask 0), so nothing to strip.
        addr = raw & ADDR_MASK
        if level == 0 or (self.can_hold_leaf(level) and raw & PS):
            return Decoded(EntryType.OA, addr)
        return Decoded(EntryType.TABLE, addr)

    def leaf_attrs(self, prot: int, features: Features) -> int:
        # READ is implied by P; NOEXEC is ignored (XD is never set).
        bits = U | A
        if prot & Prot.WRITE:
            bits |= RW | D
        return bits

    def encode_leaf(self, oa: int, level: int, size_lg2: int, attrs: int) -> int:
        if not self.can_hold_leaf(level) or size_lg2 != item_lg2sz(level):
            raise InvalidArgument(f"x86_64: no 2^{size_lg2} leaf at level {level}")
        if oa < 0 or oa % (1 << size_lg2) or oa >> self.max_oa_lg2:
            raise InvalidArgument(f"x86_64: bad leaf OA {oa:#x} for size 2^{size_lg2}")
        value = P | oa | attrs
        if level != 0:
            value |= PS
        return value & U64_MASK

    def encode_table(self, child_phys: int, level: int, features: Features) -> int:
        if not self.can_hold_table(level):
            raise InvalidArgument(f"x86_64: level {level} cannot point to a table")
        if child_phys < 0 or child_phys % (1 << GRANULE_LG2) or child_phys >> self.max_oa_lg2:
            raise InvalidArgument(f"x86_64: bad table address {child_phys:#x}")
        value = P | RW | U | A | child_phys
        # Incoherent walkers: pointers are marked once the item was flushed.
        if self.effective(Feature.DMA_INCOHERENT, features):
            value |= self.sw_bit(SW_BIT_CACHE_FLUSH_DONE)
        return value


X86_64 = X86_64Format()
