"""One connection per Store and process (``db.connection``), reused by every transaction.

It is opened once, switched between read-only and writing per transaction,
replaced after an error broke it or in a forked child, and closed with the
store; SQLite checkpoints by its own policy, not at every transaction.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError

from iommupt_store.domains import domain_alloc, list_domains
from iommupt_store.errors import NotPermitted
from iommupt_store.machine import Machine
from iommupt_store.store import Store


def _connects(store: Store) -> list[int]:
    opened: list[int] = []

    @event.listens_for(store.engine, "connect")
    def _count(dbapi_conn: Any, _rec: Any) -> None:
        opened.append(id(dbapi_conn))

    return opened


def test_transactions_share_one_connection(store: Store) -> None:
    opened = _connects(store)
    store.create_machine("m", 64 << 20)
    machine = store.machine("m")
    for _ in range(5):
        with machine.transaction() as tx:
            domain_alloc(tx, "x86_64")
        with machine.transaction(write=False) as tx:
            assert list_domains(tx)
    store.observe("m")
    store.status()
    assert len(opened) <= 1  # none at all when the one opened by Store.init is still the one in use


def test_observer_is_read_only_and_writers_write_again(store: Store) -> None:
    store.create_machine("m", 64 << 20)
    observer = store.observe("m")
    with observer.transaction(write=False) as tx, pytest.raises(OperationalError, match=r"readonly|read-only"):
        tx.conn.execute(text("UPDATE machine SET mem_bytes = mem_bytes"))
    with pytest.raises(NotPermitted):
        observer.transaction().__enter__()
    machine = store.machine("m")  # the same connection, query_only switched off again
    with machine.transaction() as tx:
        domain_alloc(tx, "x86_64")
    with observer.transaction(write=False) as tx:
        assert len(list_domains(tx)) == 1


def test_an_error_rolls_back_and_the_next_transaction_works(machine: Machine) -> None:
    with pytest.raises(RuntimeError), machine.transaction() as tx:
        domain_alloc(tx, "x86_64")
        raise RuntimeError("boom")
    with machine.transaction() as tx:
        assert list_domains(tx) == []


def test_an_invalidated_connection_is_replaced(machine: Machine) -> None:
    with pytest.raises(Exception, match="invalid"), machine.transaction() as tx:
        first = tx.conn
        tx.conn.invalidate()  # as when the server goes away mid-transaction
        tx.conn.execute(text("SELECT 1"))
    with machine.transaction() as tx:
        assert tx.conn is not first
        domain_alloc(tx, "x86_64")
    with machine.transaction(write=False) as tx:
        assert len(list_domains(tx)) == 1


def test_a_nested_transaction_gets_a_connection_of_its_own(machine: Machine) -> None:
    with machine.transaction() as tx:
        domain_alloc(tx, "x86_64")
        with machine.transaction(write=False) as inner:
            assert inner.conn is not tx.conn
            assert list_domains(inner) == []  # the outer one has not committed
    with machine.transaction(write=False) as tx:
        assert len(list_domains(tx)) == 1


def test_another_thread_may_use_the_store(machine: Machine) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with machine.transaction() as tx:
                domain_alloc(tx, "x86_64")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert not errors
    with machine.transaction(write=False) as tx:
        assert len(list_domains(tx)) == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connection(machine: Machine) -> None:
    with machine.transaction() as tx:
        parent_conn = tx.conn
    pid = os.fork()
    if pid == 0:  # the child: never touches the parent's connection
        code = 1
        try:
            with machine.transaction() as tx:
                code = 0 if tx.conn is not parent_conn else 2
                domain_alloc(tx, "x86_64")
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with machine.transaction() as tx:  # the parent's connection still works, and sees the child's commit
        assert tx.conn is parent_conn
        assert len(list_domains(tx)) == 1


def test_checkpoint_by_sqlite_policy_not_per_transaction(store: Store, db_path: Path) -> None:
    store.create_machine("m", 64 << 20)
    machine = store.machine("m")
    for _ in range(3):
        with machine.transaction() as tx:
            domain_alloc(tx, "x86_64")
    wal = Path(f"{db_path}-wal")
    assert wal.exists() and wal.stat().st_size > 0  # committed, not yet copied back
    store.close()
    assert not wal.exists() or wal.stat().st_size == 0  # the last connection closed: checkpointed
    with Store(db_path) as again, again.machine("m").transaction(write=False) as tx:
        assert len(list_domains(tx)) == 3
