"""RISC-V Sv39/Sv48/Sv57 page table, 64-bit (kernel ``fmt/riscv.h``).

Leaves are allowed at every level including the top. Svnapot adds 64 KiB
contiguous leaves at level 0 (16 identical items with N and PPN bit 3 set);
Svpbmt adds memory-type bits.
"""

from __future__ import annotations

from typing import ClassVar

from iommupt_store.errors import InvalidArgument, NotSupported
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

V = 1 << 0
R = 1 << 1
W = 1 << 2
X = 1 << 3
U = 1 << 4
G = 1 << 5
A = 1 << 6
D = 1 << 7
PPN_SHIFT = 10
PPN_MASK = (1 << 44) - 1  # bits 53..10 once shifted down
NC = 1 << 61
IO = 1 << 62
N = 1 << 63
#: PPN bit 3: with PPN bits 0..2 clear it says "64 KiB NAPOT"
NAPOT_64K_CODE = 1 << 13
NAPOT_64K_LG2 = 16
NAPOT_64K_PPN_SHIFT = 14
NAPOT_64K_PPN_MASK = (1 << 40) - 1  # bits 53..14 once shifted down

#: descriptor bits ``attr_from_entry`` keeps
ATTR_MASK = R | W | X | U | G | A | D | NC | IO

#: hw VA width -> top level (Sv39, Sv48, Sv57)
_TOP_FOR_VA = {39: 2, 48: 3, 57: 4}


class RiscvFormat(PageTableFormat):
    name: ClassVar[str] = "riscv"
    max_va_lg2: ClassVar[int] = 57
    max_oa_lg2: ClassVar[int] = 56
    max_top_level: ClassVar[int] = 4
    # RISCV_SVPBMT is listed although the production iommu_riscv64.c read for
    # the spec does not list it: the KUnit configs (debug build) use it, and
    # newer trees encode IOMMU_MMIO/IOMMU_CACHE with it.
    supported: ClassVar[Features] = frozenset(
        {
            Feature.SIGN_EXTEND,
            Feature.FLUSH_RANGE,
            Feature.RISCV_SVNAPOT_64K,
            Feature.RISCV_SVPBMT,
        }
    )
    forced: ClassVar[Features] = frozenset()
    max_sw_bit: ClassVar[int | None] = None
    has_dirty: ClassVar[bool] = False
    attr_mask: ClassVar[int] = ATTR_MASK
    oa_mask: ClassVar[int] = PPN_MASK << PPN_SHIFT
    oa_raw_shift: ClassVar[int] = PPN_SHIFT

    # -- configuration -------------------------------------------------------
    def geometry(
        self,
        *,
        top_level: int | None,
        hw_max_vasz_lg2: int,
        hw_max_oasz_lg2: int,
        features: Features,
    ) -> Geometry:
        # ``top_level`` is ignored: the VA width selects Sv39/48/57.
        if hw_max_vasz_lg2 not in _TOP_FOR_VA:
            raise InvalidArgument(f"riscv: hw VA must be 39, 48 or 57 bits, got {hw_max_vasz_lg2}")
        if hw_max_oasz_lg2 <= 0:
            raise InvalidArgument(f"riscv: bad hw OA size {hw_max_oasz_lg2}")
        return Geometry(
            top_level=_TOP_FOR_VA[hw_max_vasz_lg2],
            max_vasz_lg2=hw_max_vasz_lg2,
            max_oasz_lg2=min(self.max_oa_lg2, hw_max_oasz_lg2),
        )

    # -- geometry ------------------------------------------------------------
    def can_hold_leaf(self, level: int) -> bool:
        return 0 <= level <= self.max_top_level

    def possible_sizes(self, level: int, *, features: Features = frozenset()) -> int:
        """Leaf sizes at ``level``; 64 KiB at level 0 only when SVNAPOT_64K is on."""
        if not self.can_hold_leaf(level):
            return 0
        sizes = 1 << item_lg2sz(level)
        if level == 0 and self.effective(Feature.RISCV_SVNAPOT_64K, features):
            sizes |= 1 << NAPOT_64K_LG2
        return sizes

    def can_hold_table(self, level: int) -> bool:
        return 0 < level <= self.max_top_level

    # -- entries -------------------------------------------------------------
    def decode(self, raw: int, level: int, features: Features) -> Decoded:
        if not raw & V:
            return EMPTY
        if level != 0 and not raw & (R | W | X):
            return Decoded(EntryType.TABLE, ((raw >> PPN_SHIFT) & PPN_MASK) << GRANULE_LG2)
        # N is honoured whatever the runtime feature says: the entry bits
        # alone decide what the hardware walker does.
        if level == 0 and raw & N:
            oa = ((raw >> NAPOT_64K_PPN_SHIFT) & NAPOT_64K_PPN_MASK) << NAPOT_64K_LG2
            return Decoded(EntryType.OA, oa, NAPOT_64K_LG2 - GRANULE_LG2)
        return Decoded(EntryType.OA, ((raw >> PPN_SHIFT) & PPN_MASK) << GRANULE_LG2)

    def leaf_attrs(self, prot: int, features: Features) -> int:
        bits = A | U
        if prot & Prot.WRITE:
            bits |= W | R | D
        if prot & Prot.READ:
            bits |= R
        if not prot & Prot.NOEXEC:
            bits |= X
        # The kernel tests the raw feature bit here, not pt_feature().
        if Feature.RISCV_SVPBMT in features:
            if prot & Prot.MMIO:
                bits |= IO
            elif not prot & Prot.CACHE:
                bits |= NC
        if not bits & (R | W | X):
            raise NotSupported(f"riscv: prot {prot:#x} gives no R/W/X permission")
        return bits

    def encode_leaf(self, oa: int, level: int, size_lg2: int, attrs: int) -> int:
        isz = item_lg2sz(level)
        napot = level == 0 and size_lg2 == NAPOT_64K_LG2
        if not self.can_hold_leaf(level) or (size_lg2 != isz and not napot):
            raise InvalidArgument(f"riscv: no 2^{size_lg2} leaf at level {level}")
        if oa < 0 or oa % (1 << size_lg2) or oa >> self.max_oa_lg2:
            raise InvalidArgument(f"riscv: bad leaf OA {oa:#x} for size 2^{size_lg2}")
        value = V | ((oa >> GRANULE_LG2) << PPN_SHIFT) | attrs
        if napot:
            value |= N | NAPOT_64K_CODE
        return value & U64_MASK

    def encode_table(self, child_phys: int, level: int, features: Features) -> int:
        if not self.can_hold_table(level):
            raise InvalidArgument(f"riscv: level {level} cannot point to a table")
        if child_phys < 0 or child_phys % (1 << GRANULE_LG2) or child_phys >> self.max_oa_lg2:
            raise InvalidArgument(f"riscv: bad table address {child_phys:#x}")
        return V | ((child_phys >> GRANULE_LG2) << PPN_SHIFT)


RISCV = RiscvFormat()
