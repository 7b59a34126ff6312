"""fsck: a clean store passes; each kind of tampering is named; fsck changes nothing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from iommupt_store.cli import cli
from iommupt_store.devices import attach
from iommupt_store.domains import domain_alloc
from iommupt_store.fsck import fsck
from iommupt_store.liveupdate import preserve_domain
from iommupt_store.machine import Machine
from iommupt_store.store import Store

from .conftest import sqlite_dump


@pytest.fixture
def built(machine: Machine) -> tuple[Machine, int, int]:
    with machine.transaction() as tx:
        a = domain_alloc(tx, "x86_64")
        a.map_range(0, 0x80001000, 4 << 20)
        b = domain_alloc(tx, "amdv1")
        b.map_range(1 << 48, 0, 2 << 20)
        attach(tx, "00:01.0", b.id, owner="vmm")
        preserve_domain(tx, a.id, 7)
    return machine, a.id, b.id


def _report(machine: Machine) -> list[str]:
    fresh = Store(machine.store.url).machine(machine.name)
    with fresh.transaction(write=False) as tx:
        return fsck(tx).problems


def _sql(db: Path, statement: str) -> None:
    conn = sqlite3.connect(db)
    conn.execute(statement)
    conn.commit()
    conn.close()


def test_clean_store_passes_and_fsck_changes_nothing(built: tuple[Machine, int, int], db_path: Path) -> None:
    machine, _, _ = built
    before = sqlite_dump(db_path)
    assert _report(machine) == []
    assert sqlite_dump(db_path) == before


def test_changed_preserved_frame(built: tuple[Machine, int, int], db_path: Path) -> None:
    machine, a, _ = built
    _sql(
        db_path,
        f"UPDATE page SET contents = zeroblob(4096) WHERE pfn = (SELECT max(pfn) FROM page WHERE domain_id={a})",
    )
    assert any("changed after preserve" in p for p in _report(machine))


def test_orphan_and_foreign_frame(built: tuple[Machine, int, int], db_path: Path) -> None:
    machine, a, b = built
    # move one of b's tables to a: a gains an orphan, b points at a frame that is not its own
    _sql(db_path, f"UPDATE page SET domain_id={a}, level=0 WHERE pfn = (SELECT max(pfn) FROM page WHERE domain_id={b})")
    problems = _report(machine)
    assert any(f"domain {a}: 1 frame(s) unreachable" in p for p in problems)
    assert any(f"domain {b}: table pointer" in p and "not a frame of this domain" in p for p in problems)


def test_an_allocator_hint_above_free_memory(built: tuple[Machine, int, int], db_path: Path) -> None:
    machine, _, _ = built
    _sql(db_path, "UPDATE machine SET free_from = (SELECT max(pfn) FROM page) + 1")  # below it: a free hole?
    assert _report(machine) == []  # no hole: allocations were lowest-first, the hint is exact
    with machine.transaction() as tx:
        hole = tx.memory.alloc("test")
        tx.memory.alloc("test")
        tx.memory.free(hole)
    _sql(db_path, f"UPDATE machine SET free_from = {hole + 1}")
    problems = _report(machine)
    assert any(f"machine.free_from ({hole + 1:#x}) is above the free pfn {hole:#x}" in p for p in problems)


def test_cycle(built: tuple[Machine, int, int], db_path: Path) -> None:
    machine, _, b = built
    # entry 1 of b's top points back at the top itself (a table pointer, amdv1 NL = top level)
    conn = sqlite3.connect(db_path)
    top = conn.execute(f"SELECT top_phys, top_level FROM domain WHERE id={b}").fetchone()
    raw = top[0] | (top[1] << 9) | 1 | (3 << 61)
    contents = bytearray(conn.execute("SELECT contents FROM page WHERE pfn=?", (top[0] >> 12,)).fetchone()[0])
    contents[8:16] = raw.to_bytes(8, "little")
    conn.execute("UPDATE page SET contents=? WHERE pfn=?", (bytes(contents), top[0] >> 12))
    conn.commit()
    conn.close()
    assert any("reachable twice" in p for p in _report(machine))


def test_device_on_freed_domain_and_frames_of_freed_domain(built: tuple[Machine, int, int], db_path: Path) -> None:
    machine, _, b = built
    _sql(db_path, f"UPDATE domain SET state='freed', top_phys=NULL WHERE id={b}")
    problems = _report(machine)
    assert any(f"freed domain {b} still owns" in p for p in problems)
    assert any("device 0000:00:01.0 is attached to domain" in p for p in problems)


def test_cli_exit_codes(built: tuple[Machine, int, int], db_path: Path) -> None:
    machine, a, _ = built
    runner = CliRunner()
    ok = runner.invoke(cli, ["--db", str(db_path), "-m", machine.name, "fsck", "--json"])
    assert ok.exit_code == 0, ok.output
    _sql(
        db_path,
        f"UPDATE page SET contents = zeroblob(4096) WHERE pfn = (SELECT max(pfn) FROM page WHERE domain_id={a})",
    )
    bad = runner.invoke(cli, ["--db", str(db_path), "-m", machine.name, "fsck"])
    assert bad.exit_code == 65


def _report_from(machine: Machine) -> list[str]:
    """fsck through a machine attached before the tampering (attaching now may be refused)."""
    with machine.transaction(write=False) as tx:
        return fsck(tx).problems


def test_malformed_values_are_reported_with_their_rows(built: tuple[Machine, int, int], db_path: Path) -> None:
    machine, a, _ = built
    pfn = _sql_one(db_path, f"SELECT max(pfn) FROM page WHERE domain_id={a}")
    _sql(db_path, f"UPDATE page SET contents = printf('%.4096c', 'x') WHERE pfn = {pfn}")
    _sql(db_path, f"UPDATE domain SET features = 'not json' WHERE id = {a}")
    problems = _report_from(machine)
    assert f"stored data is malformed: page row (machine_id=1, pfn={pfn}): contents is not stored as blob" in problems
    assert f"stored data is malformed: domain row (id={a}): features is not valid JSON" in problems


def test_an_edited_entry_and_an_impossible_session_are_reported(built: tuple[Machine, int, int], db_path: Path) -> None:
    machine, _, _ = built
    _sql(db_path, "UPDATE handover_entry SET token = 8 WHERE token = 7")
    _sql(
        db_path,
        "INSERT INTO luo_session (machine_id, boot_id, name, state, created_at) "
        "SELECT machine_id, id, 'x', 'sealed', started_at FROM boot",
    )
    problems = _report(machine)
    assert any("handover entry 0x8" in p and "differs from what was recorded" in p for p in problems), problems
    assert any(
        "luo_session row 1 ('x', boot 1) is 'sealed'; after that boot it can only be open" in p for p in problems
    )


def test_boot_history_is_reported_and_refused(built: tuple[Machine, int, int], db_path: Path) -> None:
    machine, _, _ = built
    _sql(db_path, "UPDATE boot SET number = 3")
    assert _report_from(machine) == ["boot history: boot numbers are 3, not 1..1 (rows 1)"]
    runner = CliRunner()
    # fsck only looks (it never attaches), so it reports the history rather than being refused by it
    reported = runner.invoke(cli, ["--db", str(db_path), "-m", machine.name, "fsck"])
    assert reported.exit_code == 65
    assert "boot history: boot numbers are 3, not 1..1 (rows 1)" in reported.stdout
    # a command that attaches is refused before it changes anything
    refused = runner.invoke(cli, ["--db", str(db_path), "-m", machine.name, "domain", "create", "vtdss"])
    assert refused.exit_code == 65
    assert "impossible boot history: boot numbers are 3, not 1..1 (rows 1)" in refused.stderr


def _sql_one(db: Path, query: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute(query).fetchone()[0])
    finally:
        conn.close()
