"""Handover digests across schema revisions, and the boot history check.

Revision 0005 added the digests: a handover preserved and sealed by a 0004
database must stay restorable after ``db upgrade``, with exactly the digests
the current code records, and an edit made before the upgrade must not become
trusted by it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import select

from iommupt_store.boot_history import boot_history_problems
from iommupt_store.db import migrate
from iommupt_store.db.models import Boot
from iommupt_store.domains import domain_alloc, hardware_walker
from iommupt_store.errors import BadData
from iommupt_store.liveupdate import liveupdate, preserve_domain, restore_domain
from iommupt_store.liveupdate.digests import entry_digest, frames_digest, seal_digest
from iommupt_store.store import Store

from .conftest import sql

TOKEN = 0x42
IOVA, PADDR = 0xFFFF800000000000, 0x200000


def _preserve_and_seal(db: Path) -> None:
    """Under lu-v3: what a database from before kernel profiles holds (version-1 descriptors)."""
    with Store(db) as store:
        store.create_machine("m", 64 << 20)
        machine = store.machine("m", kernel="lu-v3")
        with machine.transaction() as tx:
            dom = domain_alloc(tx, "x86_64")
            dom.map_range(IOVA, PADDR, 4 << 20)
            preserve_domain(tx, dom.id, TOKEN)
        liveupdate(machine)


def _digests(db: Path) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    entries = sql(db, "SELECT id, digest, frames_digest FROM handover_entry ORDER BY id")
    seals = sql(db, "SELECT id, handover_digest FROM boot ORDER BY id")
    return entries, seals


def _restore(db: Path) -> int:
    with Store(db) as store:
        machine = store.machine("m", kernel="lu-v3")
        with machine.transaction() as tx:
            dom = restore_domain(tx, TOKEN)
            return hardware_walker(tx, dom.id).translate(IOVA + 0x123).phys or 0


def test_upgrade_from_0004_recomputes_the_digests_and_keeps_the_handover_restorable(db_path: Path) -> None:
    Store.init(db_path).close()
    _preserve_and_seal(db_path)
    recorded = _digests(db_path)
    assert all(d for _, d, f in recorded[0]) and recorded[1][0][1]

    migrate.downgrade(f"sqlite:///{db_path}", "0004")  # the handover as a 0004 database holds it
    columns = {r[1] for r in sql(db_path, "PRAGMA table_info(handover_entry)")}
    assert "digest" not in columns
    migrate.upgrade(f"sqlite:///{db_path}")

    assert _digests(db_path) == recorded  # the revision computes what preserve and the seal record
    assert _restore(db_path) == PADDR + 0x123


def test_an_edit_made_at_0004_stays_refused_after_the_upgrade(db_path: Path) -> None:
    """The seal digest is computed over what is stored at upgrade time, but the descriptor is still
    checked against the preserved domain, field by field."""
    Store.init(db_path).close()
    _preserve_and_seal(db_path)
    migrate.downgrade(f"sqlite:///{db_path}", "0004")
    sql(db_path, "UPDATE handover_entry SET descriptor = json_set(descriptor, '$.vasz', 47)")
    migrate.upgrade(f"sqlite:///{db_path}")
    with pytest.raises(BadData, match="does not reach 2 frame"):  # the upper half's tables
        _restore(db_path)


def test_digests_change_with_every_field() -> None:
    base = {
        "machine_id": 1,
        "boot_id": 1,
        "boot_number": 1,
        "token": 7,
        "kind": "domain",
        "compatible": "iommu-liveupdate-v1",
        "descriptor": {"vasz": 48},
        "domain_id": 1,
        "device_id": None,
        "session_id": None,
        "session_name": None,
    }
    changed = {
        "machine_id": 2,
        "boot_id": 2,
        "boot_number": 2,
        "token": 8,
        "kind": "device",
        "compatible": "x",
        "descriptor": {"vasz": 47},
        "domain_id": 2,
        "device_id": 1,
        "session_id": 1,
        "session_name": "vm",
    }
    digests = {entry_digest(**base)} | {entry_digest(**{**base, k: v}) for k, v in changed.items()}  # type: ignore[arg-type]
    assert len(digests) == len(changed) + 1
    frames = [(0x100, 0, "aa"), (0x101, 0, "bb")]
    assert frames_digest(frames) == frames_digest(frames[::-1])
    assert len({frames_digest(frames), frames_digest([(0x100, 1, "aa"), (0x101, 0, "bb")]), frames_digest([])}) == 3
    seal = {"boot_id": 1, "boot_number": 1, "entries": [(7, "d", "f")], "sessions": [], "preservations": []}
    assert seal_digest(**seal) != seal_digest(**{**seal, "sessions": [(1, "vm")]})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        ("UPDATE boot SET number = 4 WHERE number = 2", "boot numbers are 1, 4"),
        (
            "UPDATE boot SET end_kind = NULL, ended_at = NULL, handover_digest = NULL WHERE number = 1",
            "2 boots are running",
        ),
        ("UPDATE boot SET handover_digest = NULL WHERE number = 1", "no seal digest"),
        ("UPDATE boot SET end_kind = 'cold' WHERE number = 1", "carries a handover seal"),
        ("UPDATE boot SET ended_at = NULL WHERE number = 1", "end time and end kind disagree"),
        ("UPDATE boot SET number = 'two' WHERE number = 2", "not an integer"),
    ],
)
def test_boot_history_problems_name_the_rows(db_path: Path, edit: str, says: str) -> None:
    Store.init(db_path).close()
    _preserve_and_seal(db_path)
    Store(db_path).machine("m").store.close()  # boot 2 starts
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA ignore_check_constraints = ON")
    conn.execute(edit)
    conn.commit()
    conn.close()
    before = Path(db_path).read_bytes()
    with Store(db_path) as store:
        with store.engine.connect() as c:
            mid = c.execute(select(Boot.machine_id)).scalars().first()
            assert mid is not None
            problems = boot_history_problems(c, mid)
        assert any(says in p for p in problems), problems
        with pytest.raises(BadData, match="impossible boot history"):
            store.machine("m")
    assert Path(db_path).read_bytes() == before
