"""Cross-check x86_64 domains against volatility3's Intel32e layer, an independent page walker.

Optional: skipped unless the ``verify`` extra (volatility3) is installed. Volatility reads the
domain's raw frames as they are stored in the database, served by ``FrameDictLayer``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import pytest

pytest.importorskip("volatility3")

from volatility3 import framework
from volatility3.framework import contexts, exceptions, interfaces
from volatility3.framework.layers import intel

from iommupt_store.domains import domain_alloc, hardware_walker
from iommupt_store.formats.base import Prot
from iommupt_store.machine import Machine
from iommupt_store.pagetable.walker import HardwareWalker

framework.require_interface_version(2, 0, 0)

pytestmark = pytest.mark.verifier

K4, M2, G1 = 1 << 12, 1 << 21, 1 << 30
UPPER48 = 0xFFFF_8000_0000_0000
_ZERO_PAGE = bytes(4096)


class FrameDictLayer(interfaces.layers.DataLayerInterface):
    """Physical memory made of the given 4 KiB frames; zeros everywhere else (52-bit)."""

    def __init__(
        self,
        context: interfaces.context.ContextInterface,
        config_path: str,
        name: str,
        frames: Mapping[int, bytes],
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(context, config_path, name, metadata)
        self._frames = frames

    @property
    def maximum_address(self) -> int:
        return (1 << 52) - 1

    @property
    def minimum_address(self) -> int:
        return 0

    def is_valid(self, offset: int, length: int = 1) -> bool:
        return offset >= 0 and offset + length - 1 <= self.maximum_address

    def read(self, offset: int, length: int, pad: bool = False) -> bytes:
        out = bytearray()
        while length > 0:
            page, off = offset & ~0xFFF, offset & 0xFFF
            n = min(length, 4096 - off)
            out += self._frames.get(page, _ZERO_PAGE)[off : off + n]
            offset, length = offset + n, length - n
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        raise NotImplementedError("read-only")

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return []


def intel32e(frames: Mapping[int, bytes], top_phys: int) -> intel.Intel32e:
    """A fresh context and layers for one snapshot (volatility caches walks per layer: gotcha A.4.5)."""
    ctx = contexts.Context()
    ctx.add_layer(FrameDictLayer(ctx, "phys", "memory", frames))
    ctx.config["virt.memory_layer"] = "memory"
    ctx.config["virt.page_map_offset"] = top_phys
    virt = intel.Intel32e(ctx, "virt", "virt")
    ctx.add_layer(virt)
    return virt


def assert_no_uniform_table(walker: HardwareWalker) -> None:
    """Volatility treats a table whose 512 entries are all the same as not present (gotcha A.4.1)."""
    for phys, data in walker.frames.items():
        assert data != data[:8] * 512 or not any(data), f"table {phys:#x} has 512 identical entries"


def merge_runs(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """``(va, pa, size)`` runs joined where contiguous in both VA and PA, as volatility's ``mapping()`` does."""
    out: list[tuple[int, int, int]] = []
    for va, pa, size in sorted(runs):
        if out and out[-1][0] + out[-1][2] == va and out[-1][1] + out[-1][2] == pa:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + size)
        else:
            out.append((va, pa, size))
    return out


def check_against_volatility(walker: HardwareWalker, rng: random.Random) -> int:
    """Every leaf (start, end and a random offset) and a few holes; returns how many addresses were checked."""
    assert_no_uniform_table(walker)
    virt = intel32e(walker.frames, walker.top_phys)
    leaves = list(walker.leaves())
    checked = 0
    for lf in leaves:
        for off in {0, lf.size - 1, rng.randrange(lf.size)}:
            ours = walker.translate(lf.iova + off)
            pa, layer = virt.translate(lf.iova + off)
            assert (pa, layer) == (ours.phys, "memory"), hex(lf.iova + off)
            assert ours.phys == lf.phys + off
            checked += 1
        # the address after the leaf: a fault at the same level in both, or the same translation
        nxt = (lf.iova + lf.size) & ((1 << 64) - 1)
        ours = walker.translate(nxt)
        if ours.phys is None:
            if ours.fault == "not present":
                with pytest.raises(exceptions.PagedInvalidAddressException) as e:
                    virt.translate(nxt)
                assert e.value.invalid_bits == 12 + 9 * ours.level, hex(nxt)
        else:
            assert virt.translate(nxt)[0] == ours.phys
        checked += 1
    # enumeration over both halves equals our leaves, merged into runs the way volatility merges them
    found = [
        (va, pa, size)
        for lo, hi in ((0, (1 << 47) - 1), (UPPER48, (1 << 64) - 1))
        for va, size, pa, _, _ in virt.mapping(lo, hi - lo + 1, ignore_errors=True)
    ]
    assert merge_runs(found) == merge_runs([(lf.iova, lf.phys, lf.size) for lf in leaves])
    return checked


def test_fixed_mappings(machine: Machine) -> None:
    maps = [
        (0, 0x1_2345_6000, K4),  # 4K at VA 0
        (0x1FF000, 0x7000, K4),  # the last PTE of a table
        (0x40_0000, 0x4020_0000, 3 * M2),  # 2M pages
        (G1, 1 << 45, G1),  # 1G page at a high PA
        (0x7FFF_FFFF_F000, 0xF_FFFF_F000, K4),  # the last page of the lower half
        (UPPER48, 0x8000_0000, G1 + M2 + K4),  # upper half: 1G, 2M, 4K
        (0xFFFF_8880_0000_0000, 0, 2 * G1),  # a Linux-style direct map
        (0xFFFF_FFFF_FFE0_0000, 0x20_0000, M2 - K4),  # 511 4K pages up to the very top
        (0xFFFF_FFFF_FFFF_F000, 0xA000, K4),  # the very last page
    ]
    with machine.transaction() as tx:
        dom = domain_alloc(tx, "x86_64", top_level=3, vasz=48)
        for iova, pa, length in maps:
            dom.map_range(iova, pa, length)
        dom.map_range(0x10_0000_0000, 0x3000_0000, M2 + K4, Prot.READ)  # read-only
        walker = hardware_walker(tx, dom.id)
    sizes = {lf.size for lf in walker.leaves()}
    assert sizes == {K4, M2, G1}
    assert check_against_volatility(walker, random.Random(1)) > 1000


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_mappings(machine: Machine, seed: int) -> None:
    rng = random.Random(seed)
    with machine.transaction() as tx:
        dom = domain_alloc(tx, "x86_64", top_level=3, vasz=48)
        taken: list[tuple[int, int]] = []
        while len(taken) < 60:
            size = rng.choice([K4, K4, K4, M2, M2, G1])
            count = rng.randint(1, 4) if size != G1 else 1
            half = rng.choice([0, UPPER48])
            iova = half + rng.randrange(0, 1 << 47, size) if size == G1 else half + rng.randrange(0, 1 << 36, size)
            length = count * size
            if iova + length - 1 > (half | ((1 << 47) - 1)) or any(
                iova < end and start < iova + length for start, end in taken
            ):
                continue
            pa = rng.randrange(0, 1 << 50, size)
            if size == M2 and rng.random() < 0.2:
                pa += K4  # only 4K aligned: 512 x 4K per 2M instead
            dom.map_range(iova, pa, length)
            taken.append((iova, iova + length))
        if seed == 0:  # unmapping leaves holes and partly emptied tables behind
            for start, end in taken[:10]:
                dom.unmap_range(start, end - start)
        walker = hardware_walker(tx, dom.id)
    assert {lf.size for lf in walker.leaves()} >= {K4, M2}
    check_against_volatility(walker, rng)
