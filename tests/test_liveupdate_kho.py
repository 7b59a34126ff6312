"""KHO-style page preservation, the handover, and leak accounting across boots.

* preserve/unpreserve/restore of pages: what is recorded, that unpreserve is the
  exact inverse, that a boot keeps exactly what the previous one preserved, that
  a cold reboot keeps nothing;
* domains: unpreserve is the exact inverse of preserve, the seal report, a
  domain carried over two live updates (restore, free, build, preserve again);
* leak accounting: three domains preserved, two restored: the third's frames
  are reported leaked in boot N+1, stay reserved (never reused) for that boot,
  still translate, and are free memory in boot N+2.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from iommupt_store.domains import domain_alloc, frame_counts, get_domain, hardware_walker
from iommupt_store.errors import AlreadyExists, NotFound
from iommupt_store.liveupdate import (
    handover_report,
    incoming_entries,
    liveupdate,
    preserve_domain,
    preserve_pages,
    restore_domain,
    restore_pages,
    unpreserve_domain,
    unpreserve_pages,
)
from iommupt_store.machine import Machine
from iommupt_store.memory import FIRST_PFN
from iommupt_store.store import Store
from tests.conftest import RunCli, integrity, sqlite_dump

MACHINE = "lu"


@pytest.fixture
def lu_store(lu_db: Path) -> Iterator[Store]:
    with Store(lu_db) as s:
        yield s


def _sql(db: Path, query: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(query, params).fetchall()
    finally:
        conn.close()


def _next_boot(m: Machine) -> Machine:
    """The kexec: seal this boot, then the next process opens the machine."""
    liveupdate(m)
    nxt = m.store.machine(m.name)
    assert nxt.boot_number == m.boot_number + 1
    return nxt


# =========================================================================== pages


def test_preserve_pages_records_owner_order_and_hash(lu_store: Store, lu_db: Path) -> None:
    m = lu_store.machine(MACHINE)
    with m.transaction() as tx:
        a = tx.memory.alloc("test")
        tx.memory.write(a, b"hello")
        b = tx.memory.alloc("test", order=2)
        preserve_pages(tx, [(a, 0), (b, 2)], "test")
    rows = _sql(
        lu_db, "SELECT pfn, page_order, boot_id, preserved_by, content_hash, restored_boot_id FROM preservation"
    )
    assert sorted(rows) == sorted(
        [
            (a, 0, 1, "test", hashlib.sha256(b"hello" + bytes(4091)).hexdigest(), None),
            (b, 2, 1, "test", hashlib.sha256(bytes(4 << 12)).hexdigest(), None),
        ]
    )


def test_unpreserve_pages_is_the_exact_inverse(lu_store: Store, lu_db: Path) -> None:
    m = lu_store.machine(MACHINE)
    with m.transaction() as tx:
        pfns = [tx.memory.alloc("test") for _ in range(3)]
        preserve_pages(tx, [(pfns[0], 0)], "other")
    before = sqlite_dump(lu_db)
    with m.transaction() as tx:
        preserve_pages(tx, [(p, 0) for p in pfns[1:]], "test")
    assert sqlite_dump(lu_db) != before
    with m.transaction() as tx:
        unpreserve_pages(tx, [(p, 0) for p in pfns[1:]], "test")
    assert sqlite_dump(lu_db) == before


def test_next_boot_keeps_exactly_the_preserved_pages(lu_store: Store, lu_db: Path) -> None:
    m = lu_store.machine(MACHINE)
    with m.transaction() as tx:
        kept = tx.memory.alloc("test", order=1)
        tx.memory.write(kept, b"\xaa" * 8192)
        dropped = tx.memory.alloc("test")
        tx.memory.write(dropped, b"\xbb" * 4096)
        preserve_pages(tx, [(kept, 1)], "test")
    m2 = _next_boot(m)
    assert _sql(lu_db, "SELECT pfn, page_order, contents FROM page") == [(kept, 1, b"\xaa" * 8192)]
    with m2.transaction() as tx:
        restore_pages(tx, [(kept, 1)], "test")
        assert tx.memory.read(kept) == b"\xaa" * 8192
    assert _sql(lu_db, "SELECT restored_boot_id FROM preservation") == [(2,)]
    assert _sql(lu_db, "SELECT boot_id FROM page WHERE pfn = ?", kept) == [(2,)]
    # re-claimed: ordinary memory of this boot, which may free it
    with m2.transaction() as tx:
        tx.memory.free(kept)
    assert _sql(lu_db, "SELECT count(*) FROM page") == [(0,)]


def test_cold_reboot_keeps_nothing(lu_store: Store, lu_db: Path) -> None:
    m = lu_store.machine(MACHINE)
    with m.transaction() as tx:
        page = tx.memory.alloc("test")
        preserve_pages(tx, [(page, 0)], "test")
        dom = domain_alloc(tx, "x86_64")
        dom.map_range(0x1000, 0x1000, 0x1000)
        preserve_domain(tx, dom.id, 1)
    m.reboot(cold=True)
    m2 = lu_store.machine(MACHINE)
    assert _sql(lu_db, "SELECT count(*) FROM page") == [(0,)]
    assert _sql(lu_db, "SELECT state FROM domain") == [("freed",)]
    with m2.transaction() as tx:
        assert incoming_entries(tx) == []
        with pytest.raises(NotFound, match="cold"):
            restore_pages(tx, [(page, 0)], "test")
        assert handover_report(tx).leaked_frames == 0


# =========================================================================== domains


def test_unpreserve_domain_is_the_exact_inverse(lu_store: Store, lu_db: Path) -> None:
    """Under lu-v3 (series v3): the entry goes. ``test_unpreserve_marks_the_slot_deleted`` is lu-v5's."""
    m = lu_store.machine(MACHINE, kernel="lu-v3")
    with m.transaction() as tx:
        dom = domain_alloc(tx, "riscv", vasz=39, features=["SIGN_EXTEND", "RISCV_SVNAPOT_64K"])
        dom.map_range(0x10000, 0x10000, 0x30000)
        dom.map_range(0xFFFFFFC000000000, 0x200000, 2 << 20)
        dom_id = dom.id
    before = sqlite_dump(lu_db)
    with m.transaction() as tx:
        desc = preserve_domain(tx, dom_id, 0x42)
        assert desc.format == "riscv" and desc.sign_extend and desc.vasz == 39 and desc.top_level == 2
    assert _sql(lu_db, "SELECT count(*) FROM preservation")[0][0] == _sql(lu_db, "SELECT count(*) FROM page")[0][0]
    with m.transaction() as tx:
        assert unpreserve_domain(tx, 0x42) == dom_id
    assert sqlite_dump(lu_db) == before
    # mutable again, and preservable again under the same token
    with m.transaction() as tx:
        get_domain(tx, dom_id).map_range(0x100000, 0x100000, 0x1000)
        preserve_domain(tx, dom_id, 0x42)
    assert _next_boot(m).boot_number == 2


def test_unpreserve_marks_the_slot_deleted(lu_store: Store, lu_db: Path) -> None:
    """lu-v5 (the newest series): the slot stays, DELETED, its token never reused; restore skips it."""
    m = lu_store.machine(MACHINE)
    assert m.profile_name == "lu-v5"
    with m.transaction() as tx:
        dom = domain_alloc(tx, "x86_64")
        dom.map_range(0x10000, 0x10000, 0x3000)
        dom_id = dom.id
        preserve_domain(tx, dom_id, 0x42)
    with m.transaction() as tx:
        assert unpreserve_domain(tx, 0x42) == dom_id
    ((flags, desc),) = _sql(lu_db, "SELECT flags, descriptor FROM handover_entry WHERE token = 0x42")
    assert flags == 1 and json.loads(desc)["flags"] == 1
    assert _sql(lu_db, "SELECT count(*) FROM preservation") == [(0,)]
    with m.transaction() as tx:
        with pytest.raises(AlreadyExists, match="DELETED slot"):
            preserve_domain(tx, dom_id, 0x42)
        with pytest.raises(NotFound):
            unpreserve_domain(tx, 0x42)
        preserve_domain(tx, dom_id, 0x43)
    liveupdate(m)
    with lu_store.machine(MACHINE).transaction() as tx:
        assert [e.token for e in incoming_entries(tx)] == [0x43]
        with pytest.raises(NotFound):
            restore_domain(tx, 0x42)
        assert restore_domain(tx, 0x43).state == "restored"
    assert integrity(lu_db) == ("ok", [])


def test_seal_report_and_outgoing_handover(lu_store: Store) -> None:
    m = lu_store.machine(MACHINE)
    with m.transaction() as tx:
        doms = [domain_alloc(tx, f) for f in ("x86_64", "vtdss")]
        for i, d in enumerate(doms):
            d.map_range(0x40000000, 0x80000000, 4 << 20)
            preserve_domain(tx, d.id, 0x10 + i)
        extra = tx.memory.alloc("test")
        preserve_pages(tx, [(extra, 0)], "test")
        counts = frame_counts(tx)
        out = handover_report(tx).outgoing
    assert [(e.token, e.domain, e.state, e.frames) for e in out] == [
        (0x10 + i, d.id, "preserved", counts[d.id]) for i, d in enumerate(doms)
    ]
    report = liveupdate(m)
    assert (report.boot, report.domains) == (1, 2)
    assert report.frames == sum(counts.values())
    assert report.pages_preserved == report.frames + 1


def test_a_domain_carried_over_two_live_updates(lu_store: Store, lu_db: Path) -> None:
    """Boot 1 preserves, boot 2 restores and frees it and preserves a new one, boot 3 restores that."""
    m = lu_store.machine(MACHINE)
    with m.transaction() as tx:
        dom = domain_alloc(tx, "vtdss", top_level=2, vasz=39)
        dom.map_range(0x3FE400000, 0x3FE400000, 0xC2200000)
        preserve_domain(tx, dom.id, 7)
    m = _next_boot(m)
    with m.transaction() as tx:
        get_domain(tx, restore_domain(tx, 7).id).free()
        dom = domain_alloc(tx, "vtdss", top_level=2, vasz=39)
        dom.map_range(0x40000000, 0x80000000, 1 << 30)
        leaves = list(hardware_walker(tx, dom.id).leaves())
        preserve_domain(tx, dom.id, 7)  # the same token, in another boot
    m = _next_boot(m)
    with m.transaction() as tx:
        assert [e.token for e in incoming_entries(tx)] == [7]
        restored = restore_domain(tx, 7)
        assert list(hardware_walker(tx, restored.id).leaves()) == leaves
        assert handover_report(tx).leaked_frames == 0
        restored.free()
        assert frame_counts(tx) == {}
    assert _sql(lu_db, "SELECT count(*) FROM page") == [(0,)]


# =========================================================================== leak accounting


def test_unrestored_domain_leaks_for_one_boot(lu_store: Store, lu_db: Path, run_cli: RunCli) -> None:
    m = lu_store.machine(MACHINE)
    with m.transaction() as tx:
        ids = []
        for fmt in ("x86_64", "vtdss", "riscv"):
            d = domain_alloc(tx, fmt)
            d.map_range(0x40000000, 0x80001000, 4 << 20)
            d.map_range(0x3FE400000, 0x3FE400000, 0xC2200000)
            ids.append(d.id)
            preserve_domain(tx, d.id, 0x100 + len(ids))
        counts = frame_counts(tx)
        third_leaves = list(hardware_walker(tx, ids[2]).leaves())
    third = {p for (p,) in _sql(lu_db, "SELECT pfn FROM page WHERE domain_id = ?", ids[2])}
    assert len(third) == counts[ids[2]] > 0

    # boot N+1: restore two of three
    m = _next_boot(m)
    with m.transaction() as tx:
        restored = [restore_domain(tx, 0x101).id, restore_domain(tx, 0x102).id]
    with m.transaction(write=False) as tx:
        report = handover_report(tx)
    assert report.leaked_frames == counts[ids[2]]
    assert [(e.token, e.state, e.unclaimed_frames) for e in report.incoming] == [
        (0x101, "restored", 0),
        (0x102, "restored", 0),
        (0x103, "restorable", counts[ids[2]]),
    ]
    assert [e.restored_domain for e in report.incoming] == [*restored, None]
    # the command line says the same, from another process
    proc = run_cli("--machine", MACHINE, "handover", "--json", db=lu_db)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["leaked_frames"] == counts[ids[2]]

    # leaked, not free: the pages are still there, DMA still goes through them, allocation skips them
    with m.transaction() as tx:
        assert list(hardware_walker(tx, ids[2]).leaves()) == third_leaves
        fresh = {tx.memory.alloc("test") for _ in range(max(third) - FIRST_PFN + 1)}
    assert not fresh & third

    # boot N+2 (boot N+1 preserved nothing): the leaked frames are free memory again
    m = _next_boot(m)
    rows = _sql(lu_db, f"SELECT pfn FROM page WHERE pfn IN ({','.join('?' * len(third))})", *third)
    assert rows == []
    assert _sql(lu_db, "SELECT state FROM domain WHERE id = ?", ids[2]) == [("freed",)]
    assert _sql(lu_db, "SELECT count(*) FROM domain WHERE state != 'freed'") == [(0,)]
    assert _sql(lu_db, "SELECT count(*) FROM page") == [(0,)]
    with m.transaction() as tx:
        assert handover_report(tx).leaked_frames == 0
        assert incoming_entries(tx) == []
        with pytest.raises(NotFound):
            restore_domain(tx, 0x103)
    with m.transaction() as tx:
        reused = {tx.memory.alloc("test") for _ in range(max(third) - FIRST_PFN + 1)}
    assert third <= reused
