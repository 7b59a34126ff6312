"""Crash tests: a child is killed (SIGKILL) at a named crash point of a live-update operation.

For every point (preserve, unpreserve, seal, restore, free = ``before_commit`` of
a free, the boot-start hook, and a few commit points) the test sets the state up,
takes a logical dump of every table, runs the operation in a child with
``IOMMUPT_CRASHPOINT`` set, and checks: the child died by SIGKILL, the next
process finds exactly the dumped state, ``PRAGMA integrity_check`` is ok, and
running the operation again (without the crash point) succeeds and lands in the
state after it.
"""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from iommupt_store.domains import domain_alloc, frame_counts, get_domain, hardware_walker
from iommupt_store.liveupdate import liveupdate, preserve_domain, restore_domain
from iommupt_store.store import Store
from tests.conftest import crash_then_rerun, run_python

pytestmark = pytest.mark.crash

MACHINE = "lu"
TOKEN = 0x77

#: one child runs one operation on the machine and prints what it did as JSON
OP = r"""
import json, sys
from iommupt_store.domains import get_domain
from iommupt_store.liveupdate import liveupdate, preserve_domain, restore_domain, unpreserve_domain
from iommupt_store.store import Store

db, name, op, *args = sys.argv[1:]
m = Store(db).machine(name)
out = {"op": op, "boot": m.boot_number}
if op == "preserve":
    with m.transaction() as tx:
        preserve_domain(tx, int(args[0]), int(args[1]))
elif op == "unpreserve":
    with m.transaction() as tx:
        out["domain"] = unpreserve_domain(tx, int(args[0]))
elif op == "seal":
    out["seal"] = liveupdate(m).model_dump(mode="json")
elif op == "restore":
    with m.transaction() as tx:
        out["domain"] = restore_domain(tx, int(args[0])).id
elif op == "free":
    with m.transaction() as tx:
        out["freed"] = get_domain(tx, int(args[0])).free()
elif op != "attach":
    raise SystemExit(f"unknown op {op}")
print(json.dumps(out))
"""


def _build(m: Any) -> int:
    """A live x86_64 domain with a few levels of tables; returns its id."""
    with m.transaction() as tx:
        dom = domain_alloc(tx, "x86_64")
        dom.map_range(0x40000000, 0x80001000, 2 << 20)
        dom.map_range(0x3FE400000, 0x3FE400000, 0xC2200000)
        dom.map_range(0xFFFF800000000000, 0x200000, 4 << 20)
        # a domain that is not preserved: its frames are free memory in the next boot
        other = domain_alloc(tx, "vtdss")
        other.map_range(0x1000, 0x1000, 0x4000)
        return dom.id


def _preserved(m: Any) -> int:
    dom_id = _build(m)
    with m.transaction() as tx:
        preserve_domain(tx, dom_id, TOKEN)
    return dom_id


@dataclass
class Case:
    op: str
    point: str
    #: prepares the state (in this process) and returns the child's op arguments
    setup: Callable[[Store], list[str]]
    #: checks the state after the successful re-run
    check: Callable[[Path, dict[str, Any]], None]


def _q(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


# -- setups ------------------------------------------------------------------------------------
def setup_preserve(s: Store) -> list[str]:
    return [str(_build(s.machine(MACHINE))), str(TOKEN)]


def setup_unpreserve(s: Store) -> list[str]:
    _preserved(s.machine(MACHINE))
    return [str(TOKEN)]


def setup_seal(s: Store) -> list[str]:
    _preserved(s.machine(MACHINE))
    return []


def setup_restore(s: Store) -> list[str]:
    liveupdate_machine = s.machine(MACHINE)
    _preserved(liveupdate_machine)
    liveupdate(liveupdate_machine)
    s.machine(MACHINE)  # boot 2 starts here, before the dump
    return [str(TOKEN)]


def setup_free(s: Store) -> list[str]:
    setup_restore(s)
    with s.machine(MACHINE).transaction() as tx:
        dom = restore_domain(tx, TOKEN)
    return [str(dom.id)]


def setup_boot_start(s: Store) -> list[str]:
    setup_seal(s)
    liveupdate(s.machine(MACHINE))
    return []


# -- checks after the re-run -------------------------------------------------------------------
def check_preserved(db: Path, out: dict[str, Any]) -> None:
    assert _q(db, "SELECT state FROM domain WHERE id = (SELECT domain_id FROM handover_entry WHERE token = ?)", TOKEN)
    assert _q(db, "SELECT d.state FROM domain d JOIN handover_entry h ON h.domain_id = d.id") == [("preserved",)]
    frames = _q(db, "SELECT count(*) FROM page p JOIN handover_entry h ON p.domain_id = h.domain_id")[0][0]
    assert _q(db, "SELECT count(*) FROM preservation")[0][0] == frames > 0


def check_unpreserved(db: Path, out: dict[str, Any]) -> None:
    assert _q(db, "SELECT count(*) FROM preservation") == [(0,)]
    # under lu-v5 the slot stays, flagged DELETED
    assert _q(db, "SELECT count(*) FROM handover_entry WHERE flags & 1 = 0") == [(0,)]
    assert _q(db, "SELECT state FROM domain WHERE id = ?", out["domain"]) == [("live",)]


def check_sealed(db: Path, out: dict[str, Any]) -> None:
    assert _q(db, "SELECT number, end_kind FROM boot ORDER BY number") == [(1, "liveupdate")]
    assert out["seal"]["domains"] == 1
    assert out["seal"]["frames"] == _q(db, "SELECT count(*) FROM preservation")[0][0] > 0


def check_restored(db: Path, out: dict[str, Any]) -> None:
    assert _q(db, "SELECT restored_domain_id FROM handover_entry WHERE token = ?", TOKEN) == [(out["domain"],)]
    assert _q(db, "SELECT state FROM domain WHERE id = ?", out["domain"]) == [("restored",)]
    n = _q(db, "SELECT count(*) FROM preservation WHERE restored_boot_id IS NOT NULL")[0][0]
    assert n == _q(db, "SELECT count(*) FROM page WHERE domain_id = ?", out["domain"])[0][0] > 0
    assert _q(db, "SELECT count(*) FROM preservation WHERE restored_boot_id IS NULL") == [(0,)]


def check_freed(db: Path, out: dict[str, Any]) -> None:
    assert out["freed"] > 0
    assert _q(db, "SELECT count(*) FROM page WHERE domain_id IS NOT NULL") == [(0,)]
    assert _q(db, "SELECT count(*) FROM domain WHERE state != 'freed'") == [(0,)]


def check_boot_started(db: Path, out: dict[str, Any]) -> None:
    assert out["boot"] == 2
    assert _q(db, "SELECT number, end_kind FROM boot ORDER BY number") == [(1, "liveupdate"), (2, None)]
    # only the preserved frames survive; the unpreserved vtdss domain is freed
    assert _q(db, "SELECT count(*) FROM page WHERE pfn NOT IN (SELECT pfn FROM preservation)") == [(0,)]
    assert _q(db, "SELECT format, state FROM domain ORDER BY id") == [("x86_64", "preserved"), ("vtdss", "freed")]


CASES = [
    Case("preserve", "preserve", setup_preserve, check_preserved),
    Case("preserve", "before_commit", setup_preserve, check_preserved),
    Case("unpreserve", "unpreserve", setup_unpreserve, check_unpreserved),
    Case("unpreserve", "before_commit", setup_unpreserve, check_unpreserved),
    Case("seal", "seal", setup_seal, check_sealed),
    Case("seal", "before_commit", setup_seal, check_sealed),
    Case("restore", "restore", setup_restore, check_restored),
    Case("restore", "before_commit", setup_restore, check_restored),
    Case("free", "before_commit", setup_free, check_freed),
    Case("attach", "boot_start_hook", setup_boot_start, check_boot_started),
    Case("attach", "boot_start", setup_boot_start, check_boot_started),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}@{c.point}" for c in CASES])
def test_kill_at_crash_point(lu_db: Path, case: Case) -> None:
    with Store(lu_db) as s:
        args = case.setup(s)
    case.check(lu_db, crash_then_rerun(lu_db, OP, [str(lu_db), MACHINE, case.op, *args], case.point))


def test_restore_crash_then_walker_still_translates(lu_db: Path) -> None:
    """After a crash in the middle of restore, DMA continues through the old tables and restore works."""
    with Store(lu_db) as s:
        setup_restore(s)
        m = s.machine(MACHINE)
        with m.transaction(write=False) as tx:
            (old_id,) = frame_counts(tx)
            frames = frame_counts(tx)[old_id]
            leaves = list(hardware_walker(tx, old_id).leaves())
        crashed = run_python(OP, str(lu_db), MACHINE, "restore", str(TOKEN), env={"IOMMUPT_CRASHPOINT": "restore"})
        assert crashed.returncode == -signal.SIGKILL
        with m.transaction(write=False) as tx:
            assert list(hardware_walker(tx, old_id).leaves()) == leaves
        with m.transaction() as tx:
            dom = restore_domain(tx, TOKEN)
        with m.transaction() as tx:
            assert list(hardware_walker(tx, dom.id).leaves()) == leaves
            assert get_domain(tx, dom.id).free() == frames
            assert frame_counts(tx) == {}
