"""The store itself: column types, SQLite setup, opening, machines and boots."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, event, insert, select, text
from sqlalchemy.exc import StatementError

from iommupt_store import Store
from iommupt_store import open as open_machine
from iommupt_store.db.engine import BUSY_TIMEOUT_MS, make_engine
from iommupt_store.db.types import U64
from iommupt_store.errors import AlreadyExists, InvalidArgument, KernelGone, NotFound, SchemaError
from iommupt_store.machine import Machine

# -- U64 --------------------------------------------------------------------------------------------------


@pytest.fixture
def u64_table(tmp_path: Path) -> Any:
    md = MetaData()
    t = Table("u64_probe", md, Column("id", Integer, primary_key=True), Column("v", U64))
    engine = make_engine(f"sqlite:///{tmp_path / 'u64.db'}")
    md.create_all(engine)
    yield engine, t
    engine.dispose()


@pytest.mark.parametrize("value", [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 0xFFFF_8000_0000_0000])
def test_u64_round_trips_through_sqlite(u64_table: Any, value: int) -> None:
    engine, t = u64_table
    with engine.begin() as conn:
        conn.execute(insert(t).values(id=1, v=value))
    with engine.connect() as conn:
        assert conn.execute(select(t.c.v)).scalar_one() == value
        raw = conn.execute(text("SELECT v, printf('0x%x', v) FROM u64_probe")).one()
    # stored as a signed 64-bit two's complement, so plain SQL can still print the unsigned value
    assert raw[0] == (value - 2**64 if value >= 2**63 else value)
    assert int(raw[1], 16) == value


def test_u64_keeps_null(u64_table: Any) -> None:
    engine, t = u64_table
    with engine.begin() as conn:
        conn.execute(insert(t).values(id=1, v=None))
    with engine.connect() as conn:
        assert conn.execute(select(t.c.v)).scalar_one() is None


@pytest.mark.parametrize("value", [-1, 2**64, -(2**63)])
def test_u64_rejects_out_of_range(u64_table: Any, value: int) -> None:
    engine, t = u64_table
    with pytest.raises(StatementError) as err, engine.begin() as conn:
        conn.execute(insert(t).values(id=1, v=value))
    assert isinstance(err.value.orig, ValueError)
    with engine.connect() as conn:
        assert conn.execute(select(t.c.v)).all() == []


# -- SQLite setup -------------------------------------------------------------------------------------------


def test_new_database_file_is_private(store: Store, db_path: Path) -> None:
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    store.create_machine("m", 4 << 20)
    with store.engine.connect() as conn:  # hold the WAL open
        conn.execute(text("SELECT 1"))
        for suffix in ("-wal", "-shm"):  # SQLite gives its side files the database's mode
            assert stat.S_IMODE(Path(f"{db_path}{suffix}").stat().st_mode) == 0o600


def test_private_mode_ignores_a_loose_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        Store.init(tmp_path / "loose.db").close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "loose.db").stat().st_mode) == 0o600


def test_connections_use_wal_foreign_keys_and_busy_timeout(store: Store) -> None:
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == BUSY_TIMEOUT_MS


def test_foreign_keys_are_enforced(store: Store) -> None:
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError), store.writer.begin() as conn:
        conn.execute(text("INSERT INTO boot (machine_id, number, started_at) VALUES (4242, 1, '2026-01-01')"))


def _begins(store: Store) -> list[str]:
    seen: list[str] = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def _record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.upper().startswith("BEGIN"):
            seen.append(statement.upper())

    return seen


def test_writers_begin_immediate_readers_deferred(machine: Machine) -> None:
    seen = _begins(machine.store)
    with machine.transaction() as tx:
        tx.memory.alloc("test")
    assert seen == ["BEGIN IMMEDIATE"]
    seen.clear()
    with machine.transaction(write=False) as tx:
        tx.memory.is_allocated(0x100)
    assert seen == ["BEGIN DEFERRED"]
    seen.clear()
    machine.store.create_machine("other", 4 << 20)
    assert seen == ["BEGIN IMMEDIATE"]


def test_read_only_transaction_never_commits(machine: Machine) -> None:
    with machine.transaction(write=False) as tx:
        pfn = tx.memory.alloc("test")
        tx.memory.write(pfn, b"x")
    with machine.transaction(write=False) as tx:
        assert not tx.memory.is_allocated(pfn)


# -- opening ----------------------------------------------------------------------------------------------


def test_open_missing_file_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="iommupt-store init"):
        Store(tmp_path / "absent.db")
    assert list(tmp_path.iterdir()) == []


def test_open_in_missing_directory_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        Store.init(tmp_path / "no" / "such" / "x.db")
    assert list(tmp_path.iterdir()) == []


def test_open_non_database_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all\n" * 200)
    with pytest.raises(SchemaError, match="not an SQLite database") as err:
        Store(junk)
    assert err.value.exit_code == 65
    assert junk.read_bytes() == b"not a database at all\n" * 200


def test_open_foreign_sqlite_database(tmp_path: Path) -> None:
    import sqlite3

    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaError, match="not an iommupt-store database"):
        Store(other)


def test_init_is_idempotent(db_path: Path) -> None:
    Store.init(db_path).close()
    with Store.init(db_path) as s:
        assert s.status().machines == []


def test_module_open_attaches_to_machine(store: Store, db_path: Path) -> None:
    store.create_machine("default", 4 << 20)
    m = open_machine(db_path)
    assert (m.name, m.boot_number) == ("default", 1)
    m.store.close()


# -- machines and boots -----------------------------------------------------------------------------------


def test_create_machine_validates(store: Store) -> None:
    store.create_machine("a", 2 << 20)
    with pytest.raises(AlreadyExists):
        store.create_machine("a", 2 << 20)
    for name, mem in [("", 4 << 20), ("x" * 65, 4 << 20), ("b", 1 << 20), ("b", (4 << 20) + 1)]:
        with pytest.raises(InvalidArgument):
            store.create_machine(name, mem)
    assert [m.name for m in store.status().machines] == ["a"]


def test_unknown_machine_names_the_known_ones(store: Store) -> None:
    store.create_machine("alpha", 4 << 20)
    with pytest.raises(NotFound, match=r"no machine named 'beta'.*alpha"):
        store.machine("beta")


def test_new_machine_is_boot_1_and_reattaches(store: Store) -> None:
    store.create_machine("m", 4 << 20)
    first = store.machine("m")
    again = store.machine("m")
    assert first.boot_number == again.boot_number == 1
    assert first.boot_id == again.boot_id
    assert [b.number for b in store.status().machines[0].boots] == [1]


def test_cold_reboot_frees_memory_and_starts_boot_2(store: Store) -> None:
    store.create_machine("m", 4 << 20)
    m = store.machine("m")
    bystander = store.machine("m")  # another "process" attached to the same boot
    with m.transaction() as tx:
        for _ in range(10):
            tx.memory.alloc("test")
    assert m.status().pages_allocated == 10

    m.reboot(cold=True)

    with pytest.raises(KernelGone, match="boot 1"), m.transaction():
        pass
    with pytest.raises(KernelGone), bystander.transaction():
        pass
    st = store.status().machines[0]
    assert st.pages_allocated == 0
    assert [(b.number, b.end_kind) for b in st.boots] == [(1, "cold")]
    assert st.boots[0].ended_at is not None

    m2 = store.machine("m")
    assert m2.boot_number == 2
    with m2.transaction() as tx:
        assert tx.memory.alloc("test") == 0x100  # all memory is free again
    assert [(b.number, b.end_kind) for b in store.status().machines[0].boots] == [(1, "cold"), (2, None)]


def test_warm_reboot_is_not_done_here(machine: Machine) -> None:
    with pytest.raises(InvalidArgument, match="liveupdate"):
        machine.reboot(cold=False)
    with machine.transaction():
        pass


def test_status_counts_pages_and_bytes(machine: Machine) -> None:
    with machine.transaction() as tx:
        tx.memory.alloc("test")
        tx.memory.alloc("test", order=2)
    st = machine.status()
    assert st.pages_allocated == 5
    assert st.bytes_allocated == 5 * 4096
    assert st.mem_bytes == 64 << 20
    assert st.current_boot is not None and st.current_boot.number == 1
