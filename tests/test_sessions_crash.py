"""Crash tests for sessions and devices: a child is SIGKILLed at a named crash point.

The world is ``SessionWorld`` (tests/conftest.py): session ``vmm`` holds domains
A (two devices, one DID), B (one device) and U (no device); session
``other-vmm`` holds domain O, whose device is not preserved; a live domain L has
an unpreserved device. For each point of session close, retrieve, restore
within a session, device replace, session finish (and the seal and boot start
with sessions) the test sets the state up, takes a logical dump, runs the
operation in a child with ``IOMMUPT_CRASHPOINT`` set and checks: the child died
by SIGKILL, the next process finds exactly the dumped state, ``PRAGMA
integrity_check`` is ok, and running the operation again succeeds and lands in
the state after it.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from iommupt_store.devices import dma_walker
from iommupt_store.domains import frame_counts
from tests.conftest import (
    SW_DEV_A0,
    SW_DEV_A1,
    SW_DEV_B,
    SW_DEV_L,
    SW_DEV_O,
    SW_OWNER,
    SW_SESSION,
    SW_SESSION2,
    SW_TOKEN_A,
    SW_TOKEN_B,
    SW_TOKEN_O,
    SW_TOKEN_U,
    SessionWorld,
    crash_then_rerun,
    run_python,
)

pytestmark = pytest.mark.crash

MACHINE = "lu"

#: one child runs one operation and prints what it did as JSON
OP = r"""
import json, sys
from iommupt_store.devices import replace
from iommupt_store.liveupdate import liveupdate, restore_domain
from iommupt_store.liveupdate.sessions import close_session, finish_session, retrieve_session
from iommupt_store.store import Store

db, name, op, *args = sys.argv[1:]
m = Store(db).machine(name)
out = {"op": op, "boot": m.boot_number}
if op == "close":
    with m.transaction() as tx:
        out["unpreserved"] = close_session(tx, args[0])
elif op == "retrieve":
    with m.transaction() as tx:
        out["info"] = retrieve_session(tx, args[0]).model_dump(mode="json")
elif op == "restore":
    with m.transaction() as tx:
        out["domain"] = restore_domain(tx, int(args[0])).id
elif op == "replace":
    with m.transaction() as tx:
        out["freed"] = replace(tx, args[0], int(args[1]), owner=args[2])
elif op == "finish":
    with m.transaction() as tx:
        out["report"] = finish_session(tx, args[0]).model_dump(mode="json")
elif op == "seal":
    out["seal"] = liveupdate(m).model_dump(mode="json")
elif op != "boot":
    raise SystemExit(f"unknown op {op}")
print(json.dumps(out))
"""


@dataclass
class Case:
    op: str
    point: str
    #: prepares the state (in this process) and returns the child's op arguments
    setup: Callable[[SessionWorld], list[str]]
    #: checks the state after the successful re-run
    check: Callable[[SessionWorld, dict[str, Any]], None]


# -- setups ------------------------------------------------------------------------------------
def setup_close(w: SessionWorld) -> list[str]:
    return [SW_SESSION]


def setup_seal(w: SessionWorld) -> list[str]:
    return []


def setup_boot(w: SessionWorld) -> list[str]:
    from iommupt_store.liveupdate import liveupdate

    liveupdate(w.machine())  # the next process starts boot 2
    return []


def setup_retrieve(w: SessionWorld) -> list[str]:
    w.seal()
    return [SW_SESSION]


def setup_restore(w: SessionWorld) -> list[str]:
    setup_retrieve(w)
    w.retrieve()
    return [str(SW_TOKEN_A)]


def setup_replace(w: SessionWorld) -> list[str]:
    setup_restore(w)
    w.restore(SW_TOKEN_A)
    w.restore(SW_TOKEN_B)
    return [SW_DEV_B, str(w.new_domain("vtdss")), SW_OWNER]


def setup_finish(w: SessionWorld) -> list[str]:
    setup_restore(w)
    w.restore(SW_TOKEN_A)
    w.restore(SW_TOKEN_B)
    return [SW_SESSION]


# -- checks after the re-run -------------------------------------------------------------------
def _frames(w: SessionWorld, domain_id: int) -> int:
    return int(w.sql("SELECT count(*) FROM page WHERE domain_id = ?", domain_id)[0][0])


def check_closed(w: SessionWorld, out: dict[str, Any]) -> None:
    assert out["unpreserved"] == 6
    assert w.sql("SELECT name, state FROM luo_session") == [(SW_SESSION2, "open")]
    assert w.sql("SELECT token FROM handover_entry WHERE flags & 1 = 0") == [(SW_TOKEN_O,)]  # the rest DELETED
    assert w.sql("SELECT state FROM domain WHERE id IN (?, ?, ?) ORDER BY id", w.a, w.b, w.u) == [("live",)] * 3
    assert w.sql("SELECT count(*) FROM preservation")[0][0] == _frames(w, w.o)


def check_sealed(w: SessionWorld, out: dict[str, Any]) -> None:
    assert out["seal"]["domains"] == 4
    assert w.sql("SELECT number, end_kind FROM boot ORDER BY number") == [(1, "liveupdate")]
    assert w.sql("SELECT state FROM luo_session ORDER BY id") == [("sealed",), ("sealed",)]


def check_booted(w: SessionWorld, out: dict[str, Any]) -> None:
    assert out["boot"] == 2
    assert w.sql("SELECT state FROM luo_session ORDER BY id") == [("sealed",), ("sealed",)]
    devices = dict(w.sql("SELECT bdf, did FROM device"))
    assert devices == {SW_DEV_A0: 1, SW_DEV_A1: 1, SW_DEV_B: 2, SW_DEV_O: None, SW_DEV_L: None}


def check_retrieved(w: SessionWorld, out: dict[str, Any]) -> None:
    assert out["info"]["state"] == "retrieved"
    assert out["info"]["retrieved_in_boot"] == 2
    assert w.sql("SELECT name, state FROM luo_session ORDER BY id") == [
        (SW_SESSION, "retrieved"),
        (SW_SESSION2, "sealed"),
    ]


def check_restored(w: SessionWorld, out: dict[str, Any]) -> None:
    assert w.sql("SELECT state FROM domain WHERE id = ?", out["domain"]) == [("restored",)]
    rows = w.sql("SELECT domain_id, did, boot_id FROM device WHERE bdf IN (?, ?)", SW_DEV_A0, SW_DEV_A1)
    assert rows == [(out["domain"], 1, 2)] * 2
    assert w.sql("SELECT restored_domain_id FROM handover_entry WHERE token = ?", SW_TOKEN_A) == [(out["domain"],)]
    assert w.sql("SELECT count(*) FROM handover_entry WHERE restored_boot_id IS NOT NULL") == [(3,)]  # A, A0, A1


def check_replaced(w: SessionWorld, out: dict[str, Any]) -> None:
    restored_b = w.sql("SELECT restored_domain_id FROM handover_entry WHERE token = ?", SW_TOKEN_B)[0][0]
    assert out["freed"] == restored_b
    assert w.sql("SELECT state FROM domain WHERE id = ?", restored_b) == [("freed",)]
    assert _frames(w, restored_b) == 0
    (domain_id, did), *_ = w.sql("SELECT domain_id, did FROM device WHERE bdf = ?", SW_DEV_B)
    assert w.sql("SELECT state FROM domain WHERE id = ?", domain_id) == [("live",)]
    assert did not in (1, 2)


def check_finished(w: SessionWorld, out: dict[str, Any]) -> None:
    assert out["report"]["never_reclaimed"] == [f"{SW_TOKEN_U:#x}"]
    assert out["report"]["frames_never_reclaimed"] == _frames(w, w.u) > 0
    assert out["report"]["domains_reclaimed"] == [f"{SW_TOKEN_A:#x}", f"{SW_TOKEN_B:#x}"]
    assert w.sql("SELECT name, state FROM luo_session ORDER BY id") == [
        (SW_SESSION, "finished"),
        (SW_SESSION2, "sealed"),
    ]


CASES = [
    Case("close", "session_close", setup_close, check_closed),
    Case("close", "before_commit", setup_close, check_closed),
    Case("seal", "seal", setup_seal, check_sealed),
    Case("boot", "boot_start_hook", setup_boot, check_booted),
    Case("retrieve", "session_retrieve", setup_retrieve, check_retrieved),
    Case("retrieve", "before_commit", setup_retrieve, check_retrieved),
    Case("restore", "restore", setup_restore, check_restored),
    Case("restore", "before_commit", setup_restore, check_restored),
    Case("replace", "device_replace", setup_replace, check_replaced),
    Case("replace", "before_commit", setup_replace, check_replaced),
    Case("finish", "session_finish", setup_finish, check_finished),
    Case("finish", "before_commit", setup_finish, check_finished),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}@{c.point}" for c in CASES])
def test_kill_at_crash_point(lu_db: Path, case: Case) -> None:
    w = SessionWorld(lu_db)
    try:
        args = case.setup(w)
    finally:
        w.store.close()
    case.check(w, crash_then_rerun(lu_db, OP, [str(lu_db), MACHINE, case.op, *args], case.point))


def test_dma_continues_through_crashed_restore_and_replace(lu_db: Path) -> None:
    """A device's DMA sees the same translations across a crashed restore and a crashed replace."""
    w = SessionWorld(lu_db)
    try:
        with w.machine().transaction(write=False) as tx:
            leaves = dma_walker(tx, SW_DEV_B).leaves()
        setup_restore(w)
        for point in ("restore", "before_commit"):
            crashed = run_python(OP, str(lu_db), MACHINE, "restore", str(SW_TOKEN_B), env={"IOMMUPT_CRASHPOINT": point})
            assert crashed.returncode == -signal.SIGKILL
            with w.machine().transaction(write=False) as tx:
                assert dma_walker(tx, SW_DEV_B).leaves() == leaves
        restored = w.restore(SW_TOKEN_B)
        new = w.new_domain("vtdss")
        for point in ("device_replace", "before_commit"):
            args = [SW_DEV_B, str(new), SW_OWNER]
            crashed = run_python(OP, str(lu_db), MACHINE, "replace", *args, env={"IOMMUPT_CRASHPOINT": point})
            assert crashed.returncode == -signal.SIGKILL
            with w.machine().transaction(write=False) as tx:
                assert dma_walker(tx, SW_DEV_B).leaves() == leaves
                assert w.sql("SELECT domain_id, did FROM device WHERE bdf = ?", SW_DEV_B) == [(restored, 2)]
        again = run_python(OP, str(lu_db), MACHINE, "replace", SW_DEV_B, str(new), SW_OWNER)
        assert json.loads(again.stdout)["freed"] == restored
        with w.machine().transaction(write=False) as tx:
            assert dma_walker(tx, SW_DEV_B).leaves() == []
            assert restored not in frame_counts(tx)
    finally:
        w.store.close()
