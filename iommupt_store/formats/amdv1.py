"""AMD IOMMU v1 host page table (kernel ``fmt/amdv1.h``).

Levels follow the generic numbering (level 0 = 4 KiB items = AMD "mode 1").
A leaf's size is either the item size (NEXT_LEVEL = 0) or any larger power of
two encoded as a run of ones in the low OA bits (NEXT_LEVEL = 7), written into
every item the page covers.
"""

from __future__ import annotations

from typing import ClassVar

from iommupt_store.errors import InvalidArgument
from iommupt_store.formats.base import (
    EMPTY,
    GRANULE_LG2,
    TABLE_ITEMS_LG2,
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

PR = 1 << 0
D = 1 << 6
NL_SHIFT = 9
NL_MASK = 0x7 << NL_SHIFT
OA_SHIFT = 12
OA_FIELD_MASK = (1 << 40) - 1  # bits 51..12 once shifted down
FC = 1 << 60
IR = 1 << 61
IW = 1 << 62

NL_DEFAULT = 0
NL_SIZE = 7

#: descriptor bits ``attr_from_entry`` keeps
ATTR_MASK = FC | IR | IW


def _trailing_ones(value: int) -> int:
    return ((value ^ (value + 1)).bit_length()) - 1


class AmdV1Format(PageTableFormat):
    name: ClassVar[str] = "amdv1"
    max_va_lg2: ClassVar[int] = 64
    max_oa_lg2: ClassVar[int] = 52
    max_top_level: ClassVar[int] = 5
    supported: ClassVar[Features] = frozenset(
        {
            Feature.FULL_VA,
            Feature.DYNAMIC_TOP,
            Feature.FLUSH_RANGE,
            Feature.FLUSH_RANGE_NO_GAPS,
            Feature.AMDV1_ENCRYPT_TABLES,
            Feature.AMDV1_FORCE_COHERENCE,
        }
    )
    forced: ClassVar[Features] = frozenset(
        {Feature.DYNAMIC_TOP, Feature.AMDV1_ENCRYPT_TABLES, Feature.AMDV1_FORCE_COHERENCE}
    )
    max_sw_bit: ClassVar[int | None] = None
    has_dirty: ClassVar[bool] = True
    dirty_bit: ClassVar[int] = D
    attr_mask: ClassVar[int] = ATTR_MASK
    oa_mask: ClassVar[int] = OA_FIELD_MASK << OA_SHIFT

    # -- configuration -------------------------------------------------------
    def geometry(
        self,
        *,
        top_level: int | None,
        hw_max_vasz_lg2: int,
        hw_max_oasz_lg2: int,
        features: Features,
    ) -> Geometry:
        if not 0 < hw_max_vasz_lg2 <= self.max_va_lg2 or hw_max_oasz_lg2 <= 0:
            raise InvalidArgument(f"amdv1: bad hw sizes va={hw_max_vasz_lg2} oa={hw_max_oasz_lg2}")
        if top_level is None or not 1 <= top_level <= self.max_top_level:
            raise InvalidArgument(f"amdv1: starting_level must be 1..5, got {top_level}")
        max_vasz = self.max_va_lg2
        # DYNAMIC_TOP is forced for amdv1, so this branch only matters for a
        # build where it is not (kept to mirror fmt_init).
        if not self.effective(Feature.DYNAMIC_TOP, features) and top_level != self.max_top_level:
            max_vasz = GRANULE_LG2 + TABLE_ITEMS_LG2 * (top_level + 1)
        return Geometry(
            top_level=top_level,
            max_vasz_lg2=min(max_vasz, hw_max_vasz_lg2),
            max_oasz_lg2=min(self.max_oa_lg2, hw_max_oasz_lg2),
        )

    # -- geometry ------------------------------------------------------------
    def can_hold_leaf(self, level: int) -> bool:
        # The top-most (level 5) table only holds pointers.
        return 0 <= level < self.max_top_level

    def possible_sizes(self, level: int, *, features: Features = frozenset()) -> int:
        if not self.can_hold_leaf(level):
            return 0
        isz = item_lg2sz(level)
        hi = min(51, isz + TABLE_ITEMS_LG2 - 1)
        mask = ((1 << (hi + 1)) - 1) & ~((1 << isz) - 1)
        # 512 GiB pages are unusable (hardware erratum), everything else is.
        return mask & ~(1 << 39)

    def can_hold_table(self, level: int) -> bool:
        return 0 < level <= self.max_top_level

    # -- entries -------------------------------------------------------------
    def decode(self, raw: int, level: int, features: Features) -> Decoded:
        if not raw & PR:
            return EMPTY
        # The SME C-bit is modelled as inactive (mask 0), so nothing to strip.
        field = (raw >> OA_SHIFT) & OA_FIELD_MASK
        nl = (raw & NL_MASK) >> NL_SHIFT
        if level != 0 and nl not in (NL_DEFAULT, NL_SIZE):
            return Decoded(EntryType.TABLE, field << OA_SHIFT)
        if nl == NL_DEFAULT:
            return Decoded(EntryType.OA, field << OA_SHIFT)
        if nl == NL_SIZE:
            ones = _trailing_ones(field)
            size_lg2 = ones + OA_SHIFT + 1
            oa = (field & ~((1 << ones) - 1)) << OA_SHIFT
            return Decoded(EntryType.OA, oa, max(0, size_lg2 - item_lg2sz(level)))
        # A level-0 item with a pointer NL value is malformed; the kernel warns
        # and reports OA 0.
        return Decoded(EntryType.OA, 0)

    def leaf_attrs(self, prot: int, features: Features) -> int:
        bits = 0
        if self.effective(Feature.AMDV1_FORCE_COHERENCE, features):
            bits |= FC
        if prot & Prot.READ:
            bits |= IR
        if prot & Prot.WRITE:
            bits |= IW
        # ENCRYPT_TABLES would add the SME C-bit; SME is modelled inactive.
        return bits

    def encode_leaf(self, oa: int, level: int, size_lg2: int, attrs: int) -> int:
        isz = item_lg2sz(level)
        if not self.possible_sizes(level) >> size_lg2 & 1:
            raise InvalidArgument(f"amdv1: no 2^{size_lg2} leaf at level {level}")
        if oa < 0 or oa % (1 << size_lg2) or oa >> self.max_oa_lg2:
            raise InvalidArgument(f"amdv1: bad leaf OA {oa:#x} for size 2^{size_lg2}")
        field = oa >> OA_SHIFT
        if size_lg2 == isz:
            return (PR | (field << OA_SHIFT) | attrs) & U64_MASK
        # Size code: the low (size_lg2 - 13) OA-field bits set, the next one
        # clear (guaranteed by the alignment).
        field |= (1 << (size_lg2 - OA_SHIFT - 1)) - 1
        return (PR | (NL_SIZE << NL_SHIFT) | (field << OA_SHIFT) | attrs) & U64_MASK

    def encode_table(self, child_phys: int, level: int, features: Features) -> int:
        if not self.can_hold_table(level):
            raise InvalidArgument(f"amdv1: level {level} cannot point to a table")
        if child_phys < 0 or child_phys % (1 << GRANULE_LG2) or child_phys >> self.max_oa_lg2:
            raise InvalidArgument(f"amdv1: bad table address {child_phys:#x}")
        # NL is the AMD level of the child, i.e. the generic level of the
        # holder. IR/IW always set: HW ANDs permissions along the walk.
        return PR | (level << NL_SHIFT) | child_phys | IR | IW


AMDV1 = AmdV1Format()
