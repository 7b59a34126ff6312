"""The page-table format registry.

Formats are stateless singletons looked up by name; ``pgsize_bitmap`` is the
domain page-size bitmap the kernel's ``get_info`` reports.
"""

from __future__ import annotations

from iommupt_store.errors import InvalidArgument
from iommupt_store.formats.amdv1 import AMDV1, AmdV1Format
from iommupt_store.formats.base import (
    Decoded,
    EntryType,
    Feature,
    Features,
    Geometry,
    PageTableFormat,
    Prot,
    item_lg2sz,
    pgsz_lg2_to_level,
)
from iommupt_store.formats.riscv import RISCV, RiscvFormat
from iommupt_store.formats.vtdss import VTDSS, VtdssFormat
from iommupt_store.formats.x86_64 import X86_64, X86_64Format

__all__ = [
    "FORMATS",
    "Decoded",
    "EntryType",
    "Feature",
    "Features",
    "Geometry",
    "PageTableFormat",
    "Prot",
    "get_format",
    "item_lg2sz",
    "leaf_levels",
    "pgsize_bitmap",
    "pgsz_lg2_to_level",
    "possible_sizes",
]

FORMATS: dict[str, PageTableFormat] = {f.name: f for f in (AMDV1, X86_64, VTDSS, RISCV)}

_OUR_FORMATS = (AmdV1Format, X86_64Format, VtdssFormat, RiscvFormat)


def get_format(name: str) -> PageTableFormat:
    """The format called ``name``; InvalidArgument naming the known ones otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        known = ", ".join(sorted(FORMATS))
        raise InvalidArgument(f"unknown page-table format {name!r} (known: {known})") from None


def possible_sizes(fmt: PageTableFormat, level: int, features: Features) -> int:
    """``fmt.possible_sizes(level)`` taking runtime features into account (riscv Svnapot)."""
    if isinstance(fmt, _OUR_FORMATS):
        return fmt.possible_sizes(level, features=features)
    return fmt.possible_sizes(level)


def leaf_levels(fmt: PageTableFormat, geometry: Geometry, features: Features) -> range:
    """Levels whose sizes make up the domain bitmap.

    0..top normally; with DYNAMIC_TOP every level the table may grow to, i.e.
    each level (up to the format maximum) whose item size is below max VA.
    """
    if fmt.effective(Feature.DYNAMIC_TOP, features):
        top = max(
            (lvl for lvl in range(fmt.max_top_level + 1) if item_lg2sz(lvl) < geometry.max_vasz_lg2),
            default=0,
        )
        return range(top + 1)
    return range(geometry.top_level + 1)


def pgsize_bitmap(fmt: PageTableFormat, geometry: Geometry, features: Features) -> int:
    """The domain ``pgsize_bitmap`` as Linux 7.3's ``get_info`` reports it.

    Sizes at the usable levels, then two cuts: sizes of 2**(max_vasz - 1) and up
    are hidden (7.3: a page as large as a whole top table is never offered; the
    seed's era kept them, e.g. amdv1 at VA 48 offered 128 TiB), and sizes at or
    above 2**max_oasz.
    """
    bitmap = 0
    for level in leaf_levels(fmt, geometry, features):
        bitmap |= possible_sizes(fmt, level, features)
    return bitmap & _below(geometry.max_vasz_lg2 - 1) & _below(geometry.max_oasz_lg2)


def _below(lg2: int) -> int:
    """Every size bit under 2**lg2 (all of them from 64 bits up)."""
    return (1 << lg2) - 1 if lg2 < 64 else (1 << 64) - 1
