"""The whole session/device flow, every format, through our own pytest plugin.

Boot 1 is this process; boot 2 is a child started by the ``iommupt_boot``
fixture, as a user's restart test would do it.
"""

from __future__ import annotations

from typing import Any

import pytest

from iommupt_store.devices import attach, dma_walker, list_devices, replace
from iommupt_store.domains import domain_alloc, frame_counts, get_domain
from iommupt_store.errors import Busy, NotFound
from iommupt_store.liveupdate import liveupdate, restore_domain
from iommupt_store.liveupdate.sessions import (
    create_session,
    finish_session,
    preserve_device,
    preserve_domain_in_session,
    retrieve_session,
)
from iommupt_store.machine import Machine

FORMATS = ("amdv1", "x86_64", "vtdss", "riscv")
OWNER = "vmm"
SPARE = "0000:7f:00.0"
UNCLAIMED_TOKEN = 0x1FF
MAPS = ((0x40000000, 0x80001000, 1 << 20), (0x3FE400000, 0x3FE400000, 0xC2200000))


def _bdf(i: int) -> str:
    return f"0000:{0x10 + i:02x}:00.0"


def _leaves(tx: Any, bdf: str) -> list[list[int]]:
    return [[leaf.iova, leaf.phys, leaf.size] for leaf in dma_walker(tx, bdf).leaves()]


def boot2(machine: Machine, snapshot: dict[str, Any]) -> dict[str, Any]:
    """Boot 2: continuity, DID reservation, retrieve, restore, replace, finish."""
    with machine.transaction() as tx:
        for i, fmt in enumerate(FORMATS):
            assert _leaves(tx, _bdf(i)) == snapshot[fmt]["leaves"], f"{fmt}: DMA changed across the kexec"
        with pytest.raises(NotFound):
            dma_walker(tx, SPARE)  # not preserved: detached, its DMA is blocked
        fresh = domain_alloc(tx, "vtdss")
        attach(tx, SPARE, fresh.id, owner=OWNER)
        new_did = next(d.did for d in list_devices(tx) if d.bdf == SPARE)
        assert new_did not in {snapshot[f]["did"] for f in FORMATS}, "a preserved domain id was handed out"
        retrieve_session(tx, "vm")
        with pytest.raises(Busy):
            finish_session(tx, "vm")  # devices still DMA through the preserved tables
        for i, fmt in enumerate(FORMATS):
            dom = restore_domain(tx, snapshot[fmt]["token"])
            assert _leaves(tx, _bdf(i)) == snapshot[fmt]["leaves"], f"{fmt}: DMA changed after restore"
            new = domain_alloc(tx, fmt)
            for iova, pa, length in MAPS:
                new.map_range(iova, pa, length)
            assert replace(tx, _bdf(i), new.id, owner=OWNER) == dom.id  # the restored domain is freed
            assert _leaves(tx, _bdf(i)) == snapshot[fmt]["leaves"]
        report = finish_session(tx, "vm").model_dump(mode="json")
        counts = frame_counts(tx)
        states = {str(d): get_domain(tx, d).state for d in counts}
    return {"finish": report, "frames": {str(k): v for k, v in counts.items()}, "states": states}


def test_sessions_devices_across_a_live_update(iommupt_machine: Machine, iommupt_boot: Any) -> None:
    snapshot: dict[str, Any] = {}
    with iommupt_machine.transaction() as tx:
        create_session(tx, "vm")
        for i, fmt in enumerate(FORMATS):
            dom = domain_alloc(tx, fmt)
            for iova, pa, length in MAPS:
                dom.map_range(iova, pa, length)
            attach(tx, _bdf(i), dom.id, owner=OWNER)
            preserve_domain_in_session(tx, "vm", dom.id, 0x100 + i)
            preserve_device(tx, "vm", _bdf(i), 0x200 + i)
            did = next(d.did for d in list_devices(tx) if d.bdf == _bdf(i))
            snapshot[fmt] = {"token": 0x100 + i, "leaves": _leaves(tx, _bdf(i)), "did": did}
        # a domain preserved in the session but deliberately never restored
        unclaimed = domain_alloc(tx, "x86_64")
        unclaimed.map_range(*MAPS[0])
        preserve_domain_in_session(tx, "vm", unclaimed.id, UNCLAIMED_TOKEN)
        unclaimed_frames = len(unclaimed.pt.collect_tables())
        spare = domain_alloc(tx, "vtdss")
        attach(tx, SPARE, spare.id, owner=OWNER)  # attached but not preserved
    liveupdate(iommupt_machine)

    out = iommupt_boot.run(boot2, snapshot, expect_boot=2)

    finish = out["finish"]
    assert finish["devices_reattached"] == sorted(_bdf(i) for i in range(len(FORMATS)))
    assert len(finish["domains_reclaimed"]) == len(FORMATS)
    assert finish["never_reclaimed"] == [hex(UNCLAIMED_TOKEN)]
    assert finish["frames_never_reclaimed"] == unclaimed_frames
    # what is left: the four new domains and the spare's, and the unclaimed one's preserved frames
    assert sorted(out["states"].values()) == ["live"] * 5 + ["preserved"]
    assert out["frames"][str(unclaimed.id)] == unclaimed_frames
