"""Running a batch of scenarios in one boot of the real kernel and capturing what it built.

After each scenario the guest program stops; we find the device's page table through the IOMMU's
own registers (Intel: root and context tables; AMD: the device table), copy every table out of guest
memory and let the guest go on. One boot serves the whole batch: booting is most of the cost.
"""

from __future__ import annotations

import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from .capture import CallResult, Capture, ScenarioCapture, Vendor, walk_tables
from .decode import ADDR_MASK
from .initramfs import build_initramfs
from .qemu import DEVICE_BDF, DEVICE_DEVFN, Guest, GuestFiles, OracleError
from .scenario import MapCall, Scenario, plan_text
from .setup import KERNEL_ABI, MODULES, OracleFiles

INTEL_RTADDR = 0xFED90020  # root table address register of QEMU's intel-iommu
AMD_DEVTAB = 0xFED80000  # device table base register of QEMU's amd-iommu
HUGEPAGES = 64
#: the guest program's numeric records and how many numbers each carries
_ARITY = {"pgsizes": 1, "range": 2, "map": 2, "unmap": 3, "run": 3}


class GuestPort(Protocol):
    """What following a guest needs from it (a ``Guest``, or a stand-in in tests)."""

    def lines(self) -> Iterator[str]: ...
    def resume(self) -> None: ...
    def read_u64(self, phys: int) -> int: ...
    def read_page(self, phys: int) -> bytes: ...
    def console_tail(self) -> str: ...


def find_table(guest: GuestPort, vendor: Vendor) -> tuple[int, int]:
    """(top table address, top level) of the device's domain, read from the IOMMU's registers."""
    if vendor == "intel-fs":
        return _first_stage_table(guest)
    if vendor == "intel":
        root = guest.read_u64(guest.read_u64(INTEL_RTADDR) & ADDR_MASK)  # bus 0's root entry
        if not root & 1:
            raise OracleError("intel-iommu: bus 0 has no context table")
        ctx = (root & ADDR_MASK) + DEVICE_DEVFN * 16
        lo, hi = guest.read_u64(ctx), guest.read_u64(ctx + 8)
        if not lo & 1:
            raise OracleError("intel-iommu: the device's context entry is not present")
        return lo & ADDR_MASK, (hi & 7) + 1  # AW=2: 4 levels, top level 3
    dte = guest.read_u64((guest.read_u64(AMD_DEVTAB) & ADDR_MASK) + DEVICE_DEVFN * 32)
    mode = dte >> 9 & 7
    if not dte & 1 or not 1 <= mode <= 6:
        raise OracleError(f"amd-iommu: the device table entry {dte:#x} has no page table")
    return dte & ADDR_MASK, mode - 1


def _first_stage_table(guest: GuestPort) -> tuple[int, int]:
    """Scalable mode: root entry, 256-bit context entry, PASID directory, then the PASID-table entry
    of PASID 0 (the device's own DMA), whose third word holds the first-stage pointer and level mode."""
    root = guest.read_u64(guest.read_u64(INTEL_RTADDR) & ADDR_MASK)  # lower half: devfn 0-127
    if not root & 1:
        raise OracleError("intel-iommu (scalable): bus 0 has no context table")
    ctx = guest.read_u64((root & ADDR_MASK) + DEVICE_DEVFN * 32)
    if not ctx & 1:
        raise OracleError("intel-iommu (scalable): the device's context entry is not present")
    pasid_dir = guest.read_u64(ctx & ADDR_MASK)
    if not pasid_dir & 1:
        raise OracleError("intel-iommu (scalable): PASID 0 has no PASID table")
    entry = pasid_dir & ADDR_MASK
    first, third = guest.read_u64(entry), guest.read_u64(entry + 16)
    if not first & 1 or first >> 6 & 7 != 1:
        raise OracleError(f"intel-iommu (scalable): PASID 0 does not translate with a first stage ({first:#x})")
    return third & ADDR_MASK, 3 + (third >> 2 & 3)  # FLPM 0: 4 levels


def run_batch(files: OracleFiles, scenarios: list[Scenario], vendor: Vendor) -> tuple[Capture, float]:
    """Boot once, run every scenario, capture each; returns the capture and the seconds it took."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="iommupt-oracle-") as tmp:
        work = Path(tmp)
        build_initramfs(
            work / "initrd.gz",
            busybox=files.busybox,
            guest=files.guest,
            modules={name: files.module(name) for name in MODULES},
            plan=plan_text(scenarios),
            bdf=DEVICE_BDF,
            hugepages=HUGEPAGES,
        )
        with Guest(GuestFiles(files.kernel, work / "initrd.gz", work), vendor, qemu=files.qemu(vendor)) as guest:
            captures = _follow(guest, scenarios, vendor)
    return Capture(scenarios=captures), time.monotonic() - start


def _follow(guest: GuestPort, scenarios: list[Scenario], vendor: Vendor) -> list[ScenarioCapture]:
    out: list[ScenarioCapture] = []
    pgsizes = 0
    ranges: list[tuple[int, int]] = []
    calls: list[CallResult] = []
    todo = list(scenarios)
    for line in guest.lines():
        word, *rest = line.split() or [""]
        try:
            args = [int(a, 16) for a in rest] if word in _ARITY else []
        except ValueError:
            args = []
        if word in _ARITY and (
            len(args) != _ARITY[word]
            or (word in ("map", "unmap") and not (todo and args[0] == len(calls) < len(todo[0].calls)))
            or (word == "run" and not 0 <= args[0] < len(calls))
        ):
            raise OracleError(f"unexpected record from the guest program: {line!r}")
        if word == "pgsizes":
            pgsizes, ranges, calls = args[0], [], []
        elif word == "range":
            ranges.append((args[0], args[1]))
        elif word in ("map", "unmap"):
            call = todo[0].calls[args[0]]
            if isinstance(call, MapCall) != (word == "map"):
                raise OracleError(f"guest record {line!r} does not match the plan")
            unmapped = args[2] if word == "unmap" else 0
            calls.append(CallResult(op=word, iova=call.iova, size=call.size, errno=args[1], unmapped=unmapped))
        elif word == "run":
            last = calls[args[0]]
            calls[args[0]] = last.model_copy(update={"runs": [*last.runs, (args[1], args[2])]})
        elif word == "dump":
            top, top_level = find_table(guest, vendor)

            def read(phys: int) -> list[int]:
                return list(struct.unpack("<512Q", guest.read_page(phys)))

            scenario = todo.pop(0)
            out.append(
                ScenarioCapture(
                    scenario=scenario.name,
                    vendor=vendor,
                    kernel=KERNEL_ABI,
                    pgsizes=pgsizes,
                    iova_ranges=ranges,
                    calls=calls,
                    top=top,
                    top_level=top_level,
                    tables=walk_tables(read, top, top_level, vendor),
                )
            )
            guest.resume()
    if todo:
        tail = guest.console_tail()
        raise OracleError(f"the guest stopped before scenario {todo[0].name!r}; its console ended: {tail}")
    return out
