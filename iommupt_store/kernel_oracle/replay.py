"""Replaying what the kernel did into our engine, as VFIO type1 drives the IOMMU.

Each successful map is replayed as one ``map_range`` per physically contiguous run of the buffer,
with the physical addresses the guest reported; each unmap removes whole VFIO mappings, run by run.
Calls VFIO refuses never reach the engine, as in the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import IommuptError
from ..formats import Feature, Prot, get_format
from ..pagetable.engine import PageTable
from ..pagetable.frames import DictFrames
from .capture import CallResult, ScenarioCapture, Table, Vendor, walk_tables
from .vfio import Dma, DmaList


@dataclass(frozen=True)
class DriverSetup:
    """How the vendor's driver configures its generic_pt domain under QEMU."""

    format: str
    top_level: int
    vasz: int
    oasz: int
    features: frozenset[Feature]


DRIVER_SETUP: dict[Vendor, DriverSetup] = {
    # intel-iommu, aw-bits=48: a 4-level second stage, range flushes; QEMU's IOMMU does not snoop
    # (ECAP.C clear), so table walks are incoherent and every table pointer carries the
    # "flushed" software bit
    "intel": DriverSetup("vtdss", 3, 48, 52, frozenset({Feature.FLUSH_RANGE, Feature.DMA_INCOHERENT})),
    # amd-iommu: v1 tables from starting level 2, growing on demand; 48-bit VA under QEMU
    "amd": DriverSetup(
        "amdv1",
        2,
        48,
        52,
        frozenset({Feature.DYNAMIC_TOP, Feature.AMDV1_ENCRYPT_TABLES, Feature.AMDV1_FORCE_COHERENCE}),
    ),
    # intel-iommu in scalable mode with first-stage tables (QEMU 10): the x86 4-level format, lower half
    "intel-fs": DriverSetup(
        "x86_64", 3, 48, 52, frozenset({Feature.SIGN_EXTEND, Feature.FLUSH_RANGE, Feature.DMA_INCOHERENT})
    ),
}
#: VFIO maps readable and writeable, and asks for cache-coherent DMA
VFIO_PROT = Prot.READ | Prot.WRITE | Prot.CACHE


def new_domain(vendor: Vendor) -> PageTable:
    s = DRIVER_SETUP[vendor]
    return PageTable.create(
        get_format(s.format),
        DictFrames(),
        top_level=s.top_level,
        hw_max_vasz_lg2=s.vasz,
        hw_max_oasz_lg2=s.oasz,
        features=s.features,
    )


def replay(kernel: ScenarioCapture, pt: PageTable | None = None) -> ScenarioCapture:
    """Our engine's side of ``kernel``: the same calls, and the tables it built."""
    pt = pt or new_domain(kernel.vendor)
    min_page = pt.pgsize_bitmap & -pt.pgsize_bitmap
    dmas = DmaList(min_page=min_page or 4096, iova_ranges=list(kernel.iova_ranges))
    results = [_replay_call(pt, dmas, call) for call in kernel.calls]

    def read(phys: int) -> list[int]:
        return list(pt.frames.read(phys))

    tables: dict[int, Table] = walk_tables(read, pt.top_phys, pt.top_level, kernel.vendor)
    return ScenarioCapture(
        scenario=kernel.scenario,
        vendor=kernel.vendor,
        kernel="iommupt-store",
        pgsizes=pt.pgsize_bitmap,
        iova_ranges=kernel.iova_ranges,
        calls=results,
        top=pt.top_phys,
        top_level=pt.top_level,
        tables=tables,
    )


def _replay_call(pt: PageTable, dmas: DmaList, call: CallResult) -> CallResult:
    if call.op == "map":
        err = dmas.check_map(call.iova, call.size)
        if err:
            return CallResult(op="map", iova=call.iova, size=call.size, errno=err)
        if call.errno:
            # VFIO would have mapped it, the kernel did not: no physical addresses to replay with
            return CallResult(op="map", iova=call.iova, size=call.size)
        dma = Dma(call.iova, call.size, tuple(call.runs))
        done = 0
        try:
            va = call.iova
            for phys, length in dma.runs:
                pt.map_range(va, phys, length, VFIO_PROT)
                va += length
                done += 1
        except IommuptError as e:
            _unmap_runs(pt, Dma(call.iova, call.size, dma.runs[:done]))
            return CallResult(op="map", iova=call.iova, size=call.size, errno=e.errno)
        dmas.add(dma)
        return CallResult(op="map", iova=call.iova, size=call.size, runs=list(dma.runs))
    err, hit = dmas.check_unmap(call.iova, call.size)
    if err:
        return CallResult(op="unmap", iova=call.iova, size=call.size, errno=err)
    for dma in hit:
        _unmap_runs(pt, dma)
    dmas.remove(hit)
    return CallResult(op="unmap", iova=call.iova, size=call.size, unmapped=sum(d.size for d in hit))


def _unmap_runs(pt: PageTable, dma: Dma) -> None:
    va = dma.iova
    for _, length in dma.runs:
        pt.unmap_range(va, length)
        va += length
