"""A second, deliberately separate reading of the two hardware formats the oracle compares.

Written from the vendors' manuals, sharing nothing with ``iommupt_store.formats``: it is used to
walk the kernel's tables in guest memory and to describe words in a diff, so a bug in our formats
cannot hide itself by being used on both sides.
"""

from __future__ import annotations

from typing import NamedTuple

ADDR_MASK = ((1 << 52) - 1) & ~0xFFF  # bits 51:12: a table or page address, both vendors


def item_shift(level: int) -> int:
    return 12 + 9 * level


class Item(NamedTuple):
    """One word: ``kind`` is empty, table or leaf; ``addr`` the table or output address;
    ``size`` the leaf's size in bytes (the whole contiguous entry for AMD NL=7)."""

    kind: str
    addr: int = 0
    size: int = 0
    flags: str = ""


EMPTY = Item("empty")


def decode_intel(word: int, level: int) -> Item:
    """VT-d second-stage entry: R bit 0, W bit 1, SNP bit 11, PS (page size) bit 7 above level 0."""
    if not word & 0b11:
        return EMPTY
    flags = " ".join(n for n, b in (("R", 0), ("W", 1), ("SNP", 11)) if word >> b & 1)
    if level > 0 and not word >> 7 & 1:
        return Item("table", word & ADDR_MASK, 0, flags)
    size = 1 << item_shift(level)
    return Item("leaf", word & ADDR_MASK & ~(size - 1), size, flags)


def decode_amd(word: int, level: int) -> Item:
    """AMD I/O page-table entry: PR bit 0, next level bits 11:9 (0 or 7 = a page), IR bit 61, IW 62."""
    if not word & 1:
        return EMPTY
    flags = " ".join(n for n, b in (("PR", 0), ("IR", 61), ("IW", 62), ("FC", 60)) if word >> b & 1)
    next_level = word >> 9 & 7
    if next_level not in (0, 7):
        return Item("table", word & ADDR_MASK, 0, f"{flags} NL={next_level}")
    if next_level == 0:
        size = 1 << item_shift(level)
        return Item("leaf", word & ADDR_MASK, size, flags)
    # NL=7: the size is encoded in the address: n one bits from bit 12 give 2^(13+n) bytes
    ones = 0
    while word >> (12 + ones) & 1:
        ones += 1
    size = 1 << (13 + ones)
    return Item("leaf", word & ADDR_MASK & ~(size - 1), size, f"{flags} NL=7")


def decode_x86_64(word: int, level: int) -> Item:
    """x86 4-level entry (Intel first stage): P bit 0, RW 1, US 2, PWT 3, PCD 4, A 5, D 6, PS 7, XD 63."""
    if not word & 1:
        return EMPTY
    names = (("P", 0), ("RW", 1), ("US", 2), ("PWT", 3), ("PCD", 4), ("A", 5), ("D", 6), ("G", 8), ("XD", 63))
    flags = " ".join(n for n, b in names if word >> b & 1)
    if level > 0 and not word >> 7 & 1:
        return Item("table", word & ADDR_MASK, 0, flags)
    size = 1 << item_shift(level)
    return Item("leaf", word & ADDR_MASK & ~(size - 1), size, f"{flags} PS" if level else flags)


DECODERS = {"intel": decode_intel, "amd": decode_amd, "intel-fs": decode_x86_64}


def describe(item: Item) -> str:
    if item.kind == "empty":
        return "empty"
    if item.kind == "table":
        return f"table ({item.flags})"
    return f"{size_text(item.size)} page at {item.addr:#x} ({item.flags})"


def size_text(size: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return f"{size}B"
