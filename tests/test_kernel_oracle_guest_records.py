"""Following the guest program's records and finding its tables through the IOMMU's registers,
with a stand-in for the guest: no QEMU needed."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from iommupt_store.kernel_oracle import guest_run
from iommupt_store.kernel_oracle.compare import compare
from iommupt_store.kernel_oracle.decode import decode_x86_64
from iommupt_store.kernel_oracle.qemu import OracleError
from iommupt_store.kernel_oracle.replay import replay
from iommupt_store.kernel_oracle.scenario import Scenario

SCENARIO = Scenario.model_validate(
    {
        "name": "tiny",
        "calls": [
            {"op": "map", "iova": "0x200000", "size": "8K"},
            {"op": "map", "iova": "0x200000", "size": "4K", "expect": "EEXIST"},
            {"op": "unmap", "iova": "0x200000", "size": "8K"},
            {"op": "map", "iova": "0x40000000", "size": "2M", "buffer": "2m"},
        ],
    }
)
RECORDS = [
    "hello",
    "pgsizes 40201000",
    "range 0 fedfffff",
    "range fef00000 ffffffffffff",
    "scenario tiny",
    "map 0 0",
    "run 0 7000 1000",
    "run 0 5000 1000",
    "map 1 11",
    "unmap 2 0 2000",
    "map 3 0",
    "run 3 3400000 200000",
    "dump",
    "done",
]
DEVFN = 0x18


class FakeGuest:
    """Guest memory holding a VT-d root table, a context table and a second-stage table tree."""

    def __init__(self, records: list[str]) -> None:
        self.records = records
        self.resumed = 0
        self.mem: dict[int, int] = {}
        rta, ctx = 0x10000, 0x11000
        top, l2, l1, l0 = 0x20000, 0x21000, 0x22000, 0x23000
        self.mem[0xFED90020] = rta
        self.mem[rta] = ctx | 1
        self.mem[ctx + DEVFN * 16] = top | 1
        self.mem[ctx + DEVFN * 16 + 8] = 2 | 5 << 8  # AW=2: 4 levels; domain id 5
        # what Linux leaves: an empty level-0 table under 0x200000 (the unmap could not free it),
        # and the 2M page at 0x40000000; table pointers carry the flushed software bit (bit 10)
        self.mem[top] = l2 | 0x403
        self.mem[l2] = l1 | 0x403
        self.mem[l2 + 8] = 0x25000 | 0x403
        self.mem[l1 + 8] = l0 | 0x403
        self.mem[0x25000] = 0x3400000 | 0x83

    def lines(self) -> Iterator[str]:
        yield from self.records

    def resume(self) -> None:
        self.resumed += 1

    def read_u64(self, phys: int) -> int:
        return self.mem.get(phys, 0)

    def read_page(self, phys: int) -> bytes:
        return struct.pack("<512Q", *(self.mem.get(phys + 8 * i, 0) for i in range(512)))

    def console_tail(self) -> str:
        return "(console)"


def test_records_become_a_capture_that_matches_the_engine() -> None:
    guest = FakeGuest(RECORDS)
    [kernel] = guest_run._follow(guest, [SCENARIO], "intel")
    assert guest.resumed == 1
    assert (kernel.top, kernel.top_level, kernel.pgsizes) == (0x20000, 3, 0x40201000)
    assert kernel.iova_ranges == [(0, 0xFEDFFFFF), (0xFEF00000, 0xFFFFFFFFFFFF)]
    assert [(c.op, c.errno, c.unmapped, c.runs) for c in kernel.calls] == [
        ("map", 0, 0, [(0x7000, 0x1000), (0x5000, 0x1000)]),
        ("map", 17, 0, []),
        ("unmap", 0, 0x2000, []),
        ("map", 0, 0, [(0x3400000, 0x200000)]),
    ]
    assert sorted(kernel.tables) == [0x20000, 0x21000, 0x22000, 0x23000, 0x25000]
    report = compare(kernel, replay(kernel), [c.expect for c in SCENARIO.calls])
    assert report.differences == [] and report.tables == 5


def test_the_amd_device_table_gives_top_and_level() -> None:
    guest = FakeGuest([])
    guest.mem[0xFED80000] = 0x30000 | 0x1FF
    guest.mem[0x30000 + DEVFN * 32] = 0x6000000000040000 | 4 << 9 | 3  # mode 4: 4 levels
    assert guest_run.find_table(guest, "amd") == (0x40000, 3)
    guest.mem[0x30000 + DEVFN * 32] = 0
    with pytest.raises(OracleError, match="no page table"):
        guest_run.find_table(guest, "amd")


@pytest.mark.parametrize(
    "bad",
    ["map 0", "map 0 zz", "run 9 1000 1000", "unmap 5 0 0", "map 1 0", "pgsizes", "range 1"],
)
def test_garbled_records_are_errors(bad: str) -> None:
    records = [*RECORDS[:5], bad, *RECORDS[5:]]
    with pytest.raises(OracleError, match="unexpected record"):
        guest_run._follow(FakeGuest(records), [SCENARIO], "intel")


def test_a_guest_that_stops_early_is_an_error() -> None:
    with pytest.raises(OracleError, match="stopped before scenario 'tiny'"):
        guest_run._follow(FakeGuest([*RECORDS[:6], "done"]), [SCENARIO], "intel")


def test_a_missing_context_entry_is_an_error() -> None:
    guest = FakeGuest(RECORDS)
    guest.mem[0x11000 + DEVFN * 16] = 0
    with pytest.raises(OracleError, match="context entry is not present"):
        guest_run._follow(guest, [SCENARIO], "intel")


def test_scalable_mode_pasid_walk_gives_the_first_stage_table() -> None:
    guest = FakeGuest([])
    rta, ctx, pasid_dir, pasid_table = 0x10000, 0x11000, 0x12000, 0x13000
    guest.mem[0xFED90020] = rta | 1 << 10  # SMT: scalable-mode root table
    guest.mem[rta] = ctx | 1
    guest.mem[ctx + DEVFN * 32] = pasid_dir | 0x401
    guest.mem[pasid_dir] = pasid_table | 1
    guest.mem[pasid_table] = 0x49  # present, AW=2, PGTT=1 (first stage)
    guest.mem[pasid_table + 16] = 0x50000  # FLPTR, FLPM=0: 4 levels
    assert guest_run.find_table(guest, "intel-fs") == (0x50000, 3)
    guest.mem[pasid_table] = 0x89  # PGTT=2: a second stage, not what we compare
    with pytest.raises(OracleError, match="first stage"):
        guest_run.find_table(guest, "intel-fs")


def test_x86_64_decoder() -> None:
    assert decode_x86_64(0, 1).kind == "empty"
    assert decode_x86_64(0x2E44227, 2) == ("table", 0x2E44000, 0, "P RW US A")
    assert decode_x86_64(0x400000E7, 1) == ("leaf", 0x40000000, 2 << 20, "P RW US A D PS")
    assert decode_x86_64(0x5065, 0) == ("leaf", 0x5000, 4096, "P US A D")
