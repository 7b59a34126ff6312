"""What one scenario did in the real kernel: call results, the physical runs VFIO mapped, the
page-size bitmap and every table of the domain, dumped from guest memory. Serialized as JSON so a
run can be compared again later without QEMU (``compare CAPTURE``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .decode import DECODERS

#: the emulated IOMMU and the format it walks: intel (vtdss), amd (amdv1), intel-fs (x86_64)
Vendor = Literal["intel", "amd", "intel-fs"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CallResult(_Model):
    op: Literal["map", "unmap"]
    iova: int
    size: int
    errno: int = 0
    #: bytes the unmap reported
    unmapped: int = 0
    #: (phys, bytes): the buffer's physically contiguous runs, for a successful map
    runs: list[tuple[int, int]] = Field(default_factory=list)


class Table(_Model):
    level: int
    #: index -> word, the non-zero words only
    words: dict[int, int]


class ScenarioCapture(_Model):
    scenario: str
    vendor: Vendor
    kernel: str
    pgsizes: int
    iova_ranges: list[tuple[int, int]]
    calls: list[CallResult]
    top: int
    top_level: int
    #: physical address -> table
    tables: dict[int, Table]


class Capture(_Model):
    """One guest boot's worth of scenarios."""

    format_version: Literal[1] = 1
    scenarios: list[ScenarioCapture]


def walk_tables(
    read_page: Callable[[int], list[int]], top: int, top_level: int, vendor: Vendor, limit: int = 100_000
) -> dict[int, Table]:
    """Every table reachable from ``top``, read with ``read_page(phys) -> 512 words``."""
    decode = DECODERS[vendor]
    out: dict[int, Table] = {}
    todo = [(top, top_level)]
    while todo:
        phys, level = todo.pop()
        if phys in out:
            continue
        if len(out) >= limit:
            raise ValueError(f"more than {limit} tables reachable: not a page table")
        words = read_page(phys)
        out[phys] = Table(level=level, words={i: w for i, w in enumerate(words) if w})
        if level > 0:
            todo.extend((it.addr, level - 1) for it in map(decode, words, [level] * 512) if it.kind == "table")
    return out


def words_of(table: Table) -> Iterator[int]:
    for i in range(512):
        yield table.words.get(i, 0)
