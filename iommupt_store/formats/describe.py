"""What one raw page-table entry means, as plain data (for ``pte_decode``, views and ``show``).

Each format's decoder already says whether an item is empty, a table pointer
or a leaf; this adds the permission and attribute bits a person asks about,
by name, as the hardware manuals call them.
"""

from __future__ import annotations

from typing import Any

from . import amdv1, riscv, vtdss, x86_64
from .base import EntryType, Features, PageTableFormat, item_lg2sz

#: per format: (bit, name) pairs reported under "flags" for a leaf
_LEAF_FLAGS: dict[str, tuple[tuple[int, str], ...]] = {
    "x86_64": (
        (x86_64.RW, "rw"),
        (x86_64.U, "user"),
        (x86_64.A, "accessed"),
        (x86_64.D, "dirty"),
        (x86_64.XD, "xd"),
    ),
    "vtdss": (
        (vtdss.R, "r"),
        (vtdss.W, "w"),
        (vtdss.A, "accessed"),
        (vtdss.D, "dirty"),
        (vtdss.SNP, "snoop"),
    ),
    "amdv1": (
        (amdv1.IR, "ir"),
        (amdv1.IW, "iw"),
        (amdv1.D, "dirty"),
        (amdv1.FC, "force_coherent"),
    ),
    "riscv": (
        (riscv.R, "r"),
        (riscv.W, "w"),
        (riscv.X, "x"),
        (riscv.U, "user"),
        (riscv.G, "global"),
        (riscv.A, "accessed"),
        (riscv.D, "dirty"),
        (riscv.NC, "pbmt_nc"),
        (riscv.IO, "pbmt_io"),
        (riscv.N, "napot"),
    ),
}


def permissions(fmt_name: str, raw: int) -> tuple[bool, bool]:
    """(readable, writable) of a leaf entry of ``fmt_name``."""
    if fmt_name == "x86_64":
        return True, bool(raw & x86_64.RW)  # present implies readable
    if fmt_name == "vtdss":
        return bool(raw & vtdss.R), bool(raw & vtdss.W)
    if fmt_name == "amdv1":
        return bool(raw & amdv1.IR), bool(raw & amdv1.IW)
    return bool(raw & riscv.R), bool(raw & riscv.W)


def leaf_flags(fmt_name: str, raw: int) -> list[str]:
    """Names of the attribute bits set in a leaf entry."""
    return [name for bit, name in _LEAF_FLAGS.get(fmt_name, ()) if raw & bit]


def describe_entry(fmt: PageTableFormat, level: int, raw: int, features: Features = frozenset()) -> dict[str, Any]:
    """A JSON-ready description of the u64 ``raw`` found at ``level`` of a ``fmt`` table.

    ``type`` is ``empty``, ``table`` or ``leaf``; a table gives its child's
    address, a leaf its output address (start of the whole entry), the page
    size it maps, readable/writable and the names of its attribute bits.
    """
    d = fmt.decode(raw, level, features)
    out: dict[str, Any] = {"format": fmt.name, "level": level, "raw": f"{raw:#018x}"}
    if d.type is EntryType.EMPTY:
        out["type"] = "empty"
    elif d.type is EntryType.TABLE:
        out.update(type="table", addr=f"{d.addr:#x}")
    else:
        readable, writable = permissions(fmt.name, raw)
        out.update(
            type="leaf",
            addr=f"{d.addr:#x}",
            page_size=1 << (item_lg2sz(level) + d.contig_lg2),
            readable=readable,
            writable=writable,
            flags=leaf_flags(fmt.name, raw),
        )
    return out
