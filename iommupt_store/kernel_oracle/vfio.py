"""VFIO type1 (v2) bookkeeping above the IOMMU: which DMA calls reach the page table at all.

VFIO refuses a map that overlaps one it holds (EEXIST), lies outside the usable IOVA ranges or is
not aligned to the smallest page size (EINVAL), and an unmap that would split one of its mappings
(EINVAL); it then maps and unmaps every physically contiguous run of a buffer with its own IOMMU
call. This model is shared by the random scenario generator (which predicts results) and by the
replay into our engine.
"""

from __future__ import annotations

import bisect
import errno
from dataclasses import dataclass, field

U64_LAST = (1 << 64) - 1


@dataclass(frozen=True)
class Dma:
    """One VFIO mapping: ``[iova, iova+size)`` and the physical runs behind it."""

    iova: int
    size: int
    runs: tuple[tuple[int, int], ...] = ()  # (phys, bytes), in IOVA order

    @property
    def last(self) -> int:
        return self.iova + self.size - 1


@dataclass
class DmaList:
    """The container's mappings, ordered by IOVA (``iommu->dma_list``)."""

    min_page: int
    iova_ranges: list[tuple[int, int]]  # usable (first, last) ranges, from VFIO_IOMMU_GET_INFO
    dmas: list[Dma] = field(default_factory=list)

    def _overlapping(self, first: int, last: int) -> list[Dma]:
        starts = [d.iova for d in self.dmas]
        i = max(0, bisect.bisect_right(starts, first) - 1)
        out = []
        for d in self.dmas[i:]:
            if d.iova > last:
                break
            if d.last >= first:
                out.append(d)
        return out

    def check_map(self, iova: int, size: int) -> int:
        """The errno VFIO_IOMMU_MAP_DMA fails with before touching the IOMMU, or 0."""
        if size <= 0 or (iova | size) & (self.min_page - 1):
            return errno.EINVAL
        if iova + size - 1 > U64_LAST:
            return errno.EINVAL
        last = iova + size - 1
        if self._overlapping(iova, last):
            return errno.EEXIST
        if not any(lo <= iova and last <= hi for lo, hi in self.iova_ranges):
            return errno.EINVAL
        return 0

    def add(self, dma: Dma) -> None:
        bisect.insort(self.dmas, dma, key=lambda d: d.iova)

    def check_unmap(self, iova: int, size: int) -> tuple[int, list[Dma]]:
        """The errno of VFIO_IOMMU_UNMAP_DMA (0 on success) and the mappings it removes, in order."""
        if size <= 0 or (iova | size) & (self.min_page - 1) or iova + size - 1 > U64_LAST:
            return errno.EINVAL, []
        last = iova + size - 1
        hit = self._overlapping(iova, last)
        # type1 v2 never splits a mapping: the range must start and end on mapping boundaries
        if hit and (hit[0].iova < iova or hit[-1].last > last):
            return errno.EINVAL, []
        return 0, hit

    def remove(self, dmas: list[Dma]) -> None:
        gone = {d.iova for d in dmas}
        self.dmas = [d for d in self.dmas if d.iova not in gone]
