"""Looking changes nothing: every inspecting command leaves the database byte-identical.

After each state a user meets (fresh, mapped, preserved, sealed, restored,
finished) every command that only reads runs in its own process; the SQL dump
and the database file itself (after a checkpoint) must be exactly as before,
and after a sealed live update no inspector starts the next boot.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import InvokeCli, RunCli, sqlite_dump

BDF = "0000:3b:00.1"

#: the states, each reached from the one before by these commands
STATES: list[tuple[str, list[list[str]]]] = [
    ("fresh", [["init", "--mem", "1G"]]),
    (
        "mapped",
        [
            ["domain", "create", "vtdss"],
            ["map", "1", "0x0", "0x40001000", "3M"],
            ["device", "attach", BDF, "1", "--owner", "vm"],
        ],
    ),
    (
        "preserved",
        [
            ["session", "create", "s"],
            ["preserve", "1", "--token", "0x10", "--session", "s"],
            ["device", "preserve", BDF, "--session", "s", "--token", "0x11"],
        ],
    ),
    ("sealed", [["liveupdate"]]),
    ("restored", [["session", "retrieve", "s"], ["restore", "--token", "0x10"]]),
    (
        "finished",
        [["domain", "create", "vtdss"], ["device", "replace", BDF, "3", "--owner", "vm"], ["session", "finish", "s"]],
    ),
]


def inspectors(tmp: Path) -> list[list[str]]:
    return [
        ["status"],
        ["status", "--json"],
        ["domains", "--all"],
        ["domains", "--json"],
        ["show", "1"],
        ["show", "2", "--json"],
        ["translate", "1", "0x1234"],
        ["translate", "2", "0x1234", "--json"],
        ["verify", "1"],
        ["verify", "2", "--json"],
        ["handover"],
        ["handover", "--json"],
        ["sessions"],
        ["devices", "--json"],
        ["device", "translate", BDF, "0x1234"],
        ["fsck"],
        ["fsck", "--json"],
        ["query", "SELECT count(*) FROM mapping"],
        ["query", "--csv", "SELECT * FROM preserved_frame"],
        ["export-image", str(tmp / "mem.raw")],
        ["shell", "-c", "print(len(list_domains(tx)))"],
    ]


def file_digest(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return hashlib.sha256(db.read_bytes()).hexdigest()


def boots(db: Path) -> list[tuple[int, str | None]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT number, end_kind FROM boot ORDER BY number").fetchall()
    finally:
        conn.close()


def test_inspecting_never_writes(run_cli: RunCli, cli: InvokeCli, db_path: Path, tmp_path: Path) -> None:
    """The states are made by real processes; the inspectors run in this one (they open the store anew
    each time, as a process would), which keeps the 126 inspections fast."""
    for state, steps in STATES:
        for argv in steps:
            r = run_cli(*argv)
            assert r.returncode == 0, (state, argv, r.stderr)
        dump, digest, boot_rows = sqlite_dump(db_path), file_digest(db_path), boots(db_path)
        for argv in inspectors(tmp_path):
            res = cli(*argv)
            # a domain that does not exist yet is a clean error; anything else must work
            assert res.exit_code in (0, 1, 65), (state, argv, res.exit_code, res.stderr)
            assert "internal error" not in res.stderr, (state, argv, res.stderr)
        assert boots(db_path) == boot_rows, f"an inspector started a boot in state {state}"
        assert sqlite_dump(db_path) == dump, f"an inspector changed rows in state {state}"
        assert file_digest(db_path) == digest, f"an inspector changed the file in state {state}"


def test_sealed_machine_is_shown_as_handed_over(run_cli: RunCli, db_path: Path) -> None:
    for argv in STATES[0][1] + STATES[1][1] + STATES[2][1] + STATES[3][1]:
        assert run_cli(*argv).returncode == 0, argv
    status = json.loads(run_cli("status", "--json").stdout)
    last = status["machines"][0]["boots"][-1]
    assert (last["number"], last["end_kind"]) == (1, "liveupdate")
    # the ended boot's domain still translates: DMA goes on through the preserved tables
    t = json.loads(run_cli("translate", "1", "0x1234", "--json").stdout)[0]
    assert t["phys"] == "0x40002234" and t["writable"] is True
    doms = json.loads(run_cli("domains", "--json").stdout)
    assert [(d["id"], d["state"], d["boot"]) for d in doms] == [(1, "preserved", 1)]
    assert json.loads(run_cli("fsck", "--json").stdout)["ok"] is True
    assert boots(db_path) == [(1, "liveupdate")]
    # the first command that changes state starts boot 2
    assert run_cli("session", "retrieve", "s").returncode == 0
    assert boots(db_path)[-1] == (2, None)


def test_observer_refuses_to_write(db_path: Path, run_cli: RunCli) -> None:
    from iommupt_store.errors import NotPermitted
    from iommupt_store.store import Store

    assert run_cli("init", "--mem", "1G").returncode == 0
    before = boots(db_path)
    with Store(db_path) as store:
        m = store.observe()
        with pytest.raises(NotPermitted), m.transaction():
            pass
        with m.transaction(write=False) as tx, pytest.raises(Exception, match="readonly"):
            tx.conn.exec_driver_sql("DELETE FROM machine")
    assert boots(db_path) == before
