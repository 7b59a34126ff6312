"""An exported image is walkable by an outside tool: volatility3's Intel32e layer over the raw file.

Optional: skipped unless the ``verify`` extra (volatility3) is installed. The image
is read from disk exactly as ``export-image`` wrote it (pages at their physical
addresses, zeros in the holes) and the sidecar gives the top table.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("volatility3")

from volatility3.framework import contexts
from volatility3.framework.layers import intel

from iommupt_store.domains import domain_alloc, hardware_walker
from iommupt_store.export import export_image
from iommupt_store.formats.base import Prot
from iommupt_store.machine import Machine
from tests.test_verify_volatility import FrameDictLayer

pytestmark = pytest.mark.verifier


class RawFileLayer(FrameDictLayer):
    """Physical memory read from a raw image file; zeros past its end."""

    def __init__(self, context: Any, config_path: str, name: str, path: Path) -> None:
        super().__init__(context, config_path, name, {})
        self._file = path.open("rb")
        self._size = path.stat().st_size

    def read(self, offset: int, length: int, pad: bool = False) -> bytes:
        self._file.seek(offset)
        data = self._file.read(max(0, min(length, self._size - offset)))
        return data + bytes(length - len(data))


def test_volatility_walks_an_exported_x86_64_domain(machine: Machine, tmp_path: Path) -> None:
    rng = random.Random(7)
    with machine.transaction() as tx:
        dom = domain_alloc(tx, "x86_64")
        dom.map_range(0x4000_0000, 0x1_0000_0000, 6 << 20)  # 2 MiB leaves
        dom.map_range(0x7F00_0000_1000, 0x2_0000_3000, 0x9000, Prot.READ)
        dom.map_range(0xFFFF_8000_0000_0000, 0x3_4000_0000, 1 << 30)  # a 1 GiB leaf, upper half
        for i in range(40):
            dom.map_range(0x10_0000_0000 + i * 0x5000, 0x4_0000_0000 + rng.randrange(1 << 20) * 0x1000, 0x1000)
        domain_id = dom.id
    image = tmp_path / "mem.raw"
    sidecar = export_image(machine.store.observe(machine.name), image)
    described = json.loads((tmp_path / "mem.raw.json").read_text())["domains"]
    assert [d["id"] for d in described] == [domain_id] and described[0]["levels"] == 4
    top = sidecar.domains[0].top_phys

    ctx = contexts.Context()
    ctx.add_layer(RawFileLayer(ctx, "phys", "memory", image))
    ctx.config["virt.memory_layer"] = "memory"
    ctx.config["virt.page_map_offset"] = top
    virt = intel.Intel32e(ctx, "virt", "virt")
    ctx.add_layer(virt)

    with machine.transaction(write=False) as tx:
        leaves = hardware_walker(tx, domain_id).leaves()
    checked = 0
    for leaf in leaves:
        for off in (0, leaf.size - 1, rng.randrange(leaf.size)):
            # volatility speaks canonical 48-bit addresses without the sign extension
            va = (leaf.iova + off) & ((1 << 48) - 1)
            phys, _layer = virt.translate(va)
            assert phys == leaf.phys + off, (hex(leaf.iova), off)
            checked += 1
    assert checked == 3 * len(leaves) > 100
