"""The machine's physical memory: allocation, contents, and the bulk unit of work."""

from __future__ import annotations

import errno
import random
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError

from iommupt_store.errors import InvalidArgument, NotFound, OutOfMemory
from iommupt_store.machine import Machine
from iommupt_store.memory import FIRST_PFN, MAX_ORDER, PAGE_SIZE, Allocator
from iommupt_store.store import Store
from tests.conftest import sqlite_dump


@contextmanager
def statements(machine: Machine) -> Iterator[list[tuple[str, bool, int]]]:
    """Record (statement, executemany, number of parameter sets) sent to the driver."""
    seen: list[tuple[str, bool, int]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        seen.append((" ".join(statement.split()), executemany, len(params) if executemany else 1))

    event.listen(machine.store.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(machine.store.engine, "before_cursor_execute", record)


def page_writes(seen: list[tuple[str, bool, int]]) -> list[tuple[str, bool, int]]:
    return [s for s in seen if s[0].split()[0] in ("INSERT", "UPDATE", "DELETE") and " page" in s[0]]


# -- allocation ---------------------------------------------------------------------------------------------


def _script(m: Machine, seed: int) -> list[int]:
    """A fixed mix of allocs and frees over several transactions; returns every PFN handed out."""
    rng = random.Random(seed)
    got: list[int] = []
    live: list[int] = []
    for _ in range(4):
        with m.transaction() as tx:
            for _ in range(30):
                if live and rng.random() < 0.3:
                    tx.memory.free(live.pop(rng.randrange(len(live))))
                else:
                    pfn = tx.memory.alloc("test", order=rng.choice([0, 0, 0, 1, 3]))
                    got.append(pfn)
                    live.append(pfn)
    return got


def test_allocation_is_deterministic(store: Store, tmp_path: Path) -> None:
    store.create_machine("a", 16 << 20)
    store.create_machine("b", 16 << 20)
    first = _script(store.machine("a"), seed=7)
    second = _script(store.machine("b"), seed=7)
    with Store.init(tmp_path / "other.db") as other:
        other.create_machine("c", 16 << 20)
        third = _script(other.machine("c"), seed=7)
    assert first == second == third
    assert len(set(first)) < len(first)  # the script did re-use freed PFNs


def test_first_pages_are_lowest_first_above_firmware(machine: Machine) -> None:
    with machine.transaction() as tx:
        assert [tx.memory.alloc("test") for _ in range(4)] == [FIRST_PFN + i for i in range(4)]


def test_alloc_returns_zeroed_pages_even_when_reused(machine: Machine) -> None:
    with machine.transaction() as tx:
        pfn = tx.memory.alloc("test")
        big = tx.memory.alloc("test", order=2)
        assert tx.memory.read(pfn) == bytes(PAGE_SIZE)
        assert tx.memory.read(big) == bytes(PAGE_SIZE << 2)
        tx.memory.write(pfn, b"\xff" * PAGE_SIZE)
        tx.memory.write(big, b"\xee" * (PAGE_SIZE << 2))
    with machine.transaction() as tx:
        tx.memory.free(pfn)
        tx.memory.free(big)
    with machine.transaction() as tx:
        assert tx.memory.alloc("test") == pfn
        assert tx.memory.read(pfn) == bytes(PAGE_SIZE)
        assert tx.memory.alloc("test", order=2) == big
        assert tx.memory.read(big) == bytes(PAGE_SIZE << 2)
    with machine.transaction() as tx:  # and zero is what was stored
        assert tx.memory.read(pfn) == bytes(PAGE_SIZE)


def test_free_and_realloc_in_one_transaction(machine: Machine) -> None:
    with machine.transaction() as tx:
        pfn = tx.memory.alloc("test")
        tx.memory.write(pfn, b"old")
    with machine.transaction() as tx:
        tx.memory.free(pfn)
        assert not tx.memory.is_allocated(pfn)
        assert tx.memory.alloc("other") == pfn
        assert tx.memory.read(pfn) == bytes(PAGE_SIZE)
        assert tx.memory.meta(pfn)["owner"] == "other"
    with machine.transaction(write=False) as tx:
        assert tx.memory.read(pfn) == bytes(PAGE_SIZE)
        assert tx.memory.meta(pfn)["owner"] == "other"
    assert machine.status().pages_allocated == 1


def test_freed_pfns_are_reused_lowest_first(machine: Machine) -> None:
    with machine.transaction() as tx:
        pfns = [tx.memory.alloc("test") for _ in range(10)]
    with machine.transaction() as tx:
        tx.memory.free(pfns[7])
        tx.memory.free(pfns[2])
    with machine.transaction() as tx:
        assert tx.memory.alloc("test") == pfns[2]
        assert tx.memory.alloc("test") == pfns[7]
        assert tx.memory.alloc("test") == pfns[9] + 1


@pytest.mark.parametrize("order", [1, 2, 3, 9])
def test_higher_orders_are_naturally_aligned(machine: Machine, order: int) -> None:
    with machine.transaction() as tx:
        tx.memory.alloc("test")  # make the lowest aligned slot busy
        blocks = [tx.memory.alloc("test", order=order) for _ in range(3)]
        singles = [tx.memory.alloc("test") for _ in range(3)]
    size = 1 << order
    for b in blocks:
        assert b % size == 0
    spans = [range(b, b + size) for b in blocks]
    covered = [p for s in spans for p in s]
    assert len(covered) == len(set(covered))
    assert not set(singles) & set(covered)
    with machine.transaction(write=False) as tx:
        for b in blocks:
            assert tx.memory.order(b) == order
            assert len(tx.memory.read(b)) == PAGE_SIZE << order


def test_order_outside_range_is_rejected(machine: Machine) -> None:
    with machine.transaction() as tx:
        for order in (-1, MAX_ORDER + 1):
            with pytest.raises(InvalidArgument):
                tx.memory.alloc("test", order=order)


def test_full_machine_raises_enomem(small_machine: Machine) -> None:
    usable = (small_machine.mem_bytes // PAGE_SIZE) - FIRST_PFN
    with small_machine.transaction() as tx:
        pfns = [tx.memory.alloc("test") for _ in range(usable)]
        assert max(pfns) == small_machine.mem_bytes // PAGE_SIZE - 1
        with pytest.raises(OutOfMemory) as err:
            tx.memory.alloc("test")
    assert err.value.errno == errno.ENOMEM
    assert str(err.value).startswith("ENOMEM: ")
    assert "2 MiB" in str(err.value)
    assert small_machine.status().pages_allocated == usable
    with small_machine.transaction() as tx:
        with pytest.raises(OutOfMemory):
            tx.memory.alloc("test")
        tx.memory.free(pfns[5])
        assert tx.memory.alloc("test") == pfns[5]


def test_enomem_for_an_order_that_no_longer_fits(small_machine: Machine) -> None:
    with small_machine.transaction() as tx:
        tx.memory.alloc("test", order=7)  # 128 of the 256 usable pages
        with pytest.raises(OutOfMemory):
            tx.memory.alloc("test", order=8)
        tx.memory.alloc("test", order=7)


def _free_from(machine: Machine) -> int:
    with machine.transaction(write=False) as tx:
        row = tx.conn.execute(text("SELECT free_from FROM machine WHERE id = :m"), {"m": tx.machine.id})
        return int(row.scalar_one())


def test_the_stored_hint_follows_allocations_and_every_free(machine: Machine, db_path: Path) -> None:
    """``machine.free_from`` is where the search for free pages starts: the allocator raises it,
    and deleting a page row by any statement lowers it (a trigger), so lowest-first still holds."""
    with machine.transaction() as tx:
        pfns = [tx.memory.alloc("test") for _ in range(10)]
    assert _free_from(machine) == pfns[-1] + 1
    with machine.transaction() as tx:
        tx.memory.free(pfns[6])
    assert _free_from(machine) == pfns[6]
    conn = sqlite3.connect(db_path)  # a hand edit frees a lower page
    with conn:
        conn.execute("DELETE FROM page WHERE pfn = ?", (pfns[2],))
    conn.close()
    assert _free_from(machine) == pfns[2]
    with machine.transaction() as tx:
        assert [tx.memory.alloc("test") for _ in range(3)] == [pfns[2], pfns[6], pfns[-1] + 1]
    assert _free_from(machine) == pfns[-1] + 2


@pytest.mark.parametrize("hint", ["-5", "1 << 40", "(SELECT max(pfn) FROM page) + 1000", "'abc'", "x'00'"])
def test_a_wrong_hint_costs_no_memory(small_machine: Machine, db_path: Path, hint: str) -> None:
    with small_machine.transaction() as tx:
        pfns = [tx.memory.alloc("test") for _ in range(4)]
        tx.memory.free(pfns[1])
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute(f"UPDATE machine SET free_from = {hint}")
    conn.close()
    usable = (small_machine.mem_bytes // PAGE_SIZE) - FIRST_PFN
    with small_machine.transaction() as tx:  # every free page is still found before ENOMEM
        got = [tx.memory.alloc("test") for _ in range(usable - 3)]
        assert pfns[1] in got
        with pytest.raises(OutOfMemory):
            tx.memory.alloc("test")


def test_allocator_alone() -> None:
    a = Allocator.over(FIRST_PFN + 16, [(FIRST_PFN, 0), (FIRST_PFN + 2, 1)])
    assert a.alloc(0) == FIRST_PFN + 1
    assert a.alloc(2) == FIRST_PFN + 4
    assert a.alloc(3) == FIRST_PFN + 8
    with pytest.raises(OutOfMemory):
        a.alloc(0)


# -- contents ----------------------------------------------------------------------------------------------


def test_write_read_and_words(machine: Machine) -> None:
    with machine.transaction() as tx:
        pfn = tx.memory.alloc("test")
        tx.memory.write(pfn, b"\x01\x02", offset=8)
        words = tx.memory.words_rw(pfn)
        words[2] = 0xFFFF_FFFF_FFFF_FFFF
    with machine.transaction(write=False) as tx:
        w = tx.memory.words(pfn)
        assert w[1] == 0x0201
        assert w[2] == 2**64 - 1
        with pytest.raises(TypeError):
            w[0] = 1  # read-only view
        assert tx.memory.read(pfn)[16:24] == b"\xff" * 8


def test_write_past_the_page_is_refused(machine: Machine) -> None:
    with machine.transaction() as tx:
        pfn = tx.memory.alloc("test")
        with pytest.raises(InvalidArgument):
            tx.memory.write(pfn, b"xx", offset=PAGE_SIZE - 1)
        with pytest.raises(InvalidArgument):
            tx.memory.write(pfn, b"x", offset=-1)


def test_unallocated_pfn_is_not_found(machine: Machine) -> None:
    with machine.transaction(write=False) as tx:
        with pytest.raises(NotFound):
            tx.memory.read(0x4242)
        with pytest.raises(NotFound):
            tx.memory.free(0x4242)
        assert not tx.memory.is_allocated(0x4242)


def test_meta_is_stored(machine: Machine) -> None:
    with machine.transaction() as tx:
        pfn = tx.memory.alloc("iommupt")
        assert tx.memory.meta(pfn)["boot_id"] == machine.boot_id
        tx.memory.set_meta(pfn, owner="kho")
    with machine.transaction(write=False) as tx:
        assert tx.memory.meta(pfn)["owner"] == "kho"


def test_pages_of_other_machines_are_invisible(store: Store) -> None:
    store.create_machine("a", 4 << 20)
    store.create_machine("b", 4 << 20)
    a, b = store.machine("a"), store.machine("b")
    with a.transaction() as tx:
        pa = tx.memory.alloc("test")
        tx.memory.write(pa, b"a")
    with b.transaction() as tx:
        assert not tx.memory.is_allocated(pa)
        assert tx.memory.alloc("test") == pa  # same PFN, another machine's RAM


# -- the unit of work ------------------------------------------------------------------------------------


def test_flush_inserts_new_pages_in_one_executemany(machine: Machine) -> None:
    with statements(machine) as seen, machine.transaction() as tx:
        for i in range(200):
            pfn = tx.memory.alloc("test")
            tx.memory.write(pfn, bytes([i % 256]) * 16)
            tx.memory.write(pfn, b"again", offset=100)
    writes = page_writes(seen)
    assert len(writes) == 1, writes
    stmt, many, nrows = writes[0]
    assert stmt.startswith("INSERT INTO page")
    assert many and nrows == 200
    assert machine.status().pages_allocated == 200


def test_flush_updates_each_dirty_page_once(machine: Machine) -> None:
    with machine.transaction() as tx:
        pfns = [tx.memory.alloc("test") for _ in range(60)]
    with statements(machine) as seen, machine.transaction() as tx:
        tx.memory.load(pfns)
        for _ in range(3):
            for pfn in pfns[:50]:
                tx.memory.write(pfn, b"\xab" * 8)
        for pfn in pfns[50:]:
            tx.memory.read(pfn)  # read only: not written back
    writes = page_writes(seen)
    assert len(writes) == 1, writes
    stmt, many, nrows = writes[0]
    assert stmt.startswith("UPDATE page")
    assert many and nrows == 50
    loads = [s for s in seen if s[0].startswith("SELECT") and "contents" in s[0]]
    assert len(loads) == 1  # 60 pages loaded with one query


def test_flush_deletes_in_bulk(machine: Machine) -> None:
    with machine.transaction() as tx:
        pfns = [tx.memory.alloc("test") for _ in range(40)]
    with statements(machine) as seen, machine.transaction() as tx:
        for pfn in pfns:
            tx.memory.free(pfn)
    writes = page_writes(seen)
    assert [w[0].split()[0] for w in writes] == ["DELETE"]
    assert machine.status().pages_allocated == 0


def test_alloc_then_free_in_one_transaction_writes_nothing(machine: Machine) -> None:
    with statements(machine) as seen, machine.transaction() as tx:
        pfn = tx.memory.alloc("test")
        tx.memory.write(pfn, b"gone")
        tx.memory.free(pfn)
    assert page_writes(seen) == []


def test_untouched_transaction_writes_nothing(machine: Machine) -> None:
    with machine.transaction() as tx:
        pfn = tx.memory.alloc("test")
    with statements(machine) as seen, machine.transaction() as tx:
        tx.memory.read(pfn)
        tx.memory.words(pfn)
    assert page_writes(seen) == []


def test_exception_leaves_database_unchanged(machine: Machine, db_path: Path) -> None:
    with machine.transaction() as tx:
        kept = [tx.memory.alloc("test") for _ in range(5)]
        tx.memory.write(kept[0], b"kept")
    before = sqlite_dump(db_path)

    class Boom(Exception):
        pass

    with pytest.raises(Boom), machine.transaction() as tx:
        for _ in range(50):
            tx.memory.alloc("test", order=1)
        tx.memory.write(kept[0], b"changed")
        tx.memory.free(kept[1])
        tx.memory.set_meta(kept[2], owner="nobody")
        tx.flush()  # even after the rows reached the database
        raise Boom
    assert sqlite_dump(db_path) == before
    with machine.transaction(write=False) as tx:
        assert tx.memory.read(kept[0]).startswith(b"kept")
        assert tx.memory.is_allocated(kept[1])


def test_unknown_page_columns_are_refused(machine: Machine) -> None:
    with machine.transaction() as tx:
        with pytest.raises(InvalidArgument, match="no_such_column"):
            tx.memory.alloc("test", no_such_column=1)
        pfn = tx.memory.alloc("test")
        with pytest.raises(InvalidArgument, match="contents"):
            tx.memory.set_meta(pfn, contents=b"")


def test_error_inside_flush_rolls_back(machine: Machine, db_path: Path) -> None:
    with machine.transaction() as tx:
        pfns = [tx.memory.alloc("test") for _ in range(10)]
    before = sqlite_dump(db_path)
    with pytest.raises(IntegrityError), machine.transaction() as tx:
        for pfn in pfns[:5]:
            tx.memory.free(pfn)  # DELETE runs first in the flush...
        for _ in range(20):
            tx.memory.alloc("test")
        tx.memory.set_meta(pfns[7], boot_id=424242)  # ...then this UPDATE breaks a foreign key
    assert sqlite_dump(db_path) == before


# -- a bounded cache ---------------------------------------------------------------------------------------


def _mixed_work(m: Machine, *, fail: bool) -> None:
    """Maps, an unmap, a free and (with ``fail``) a map that fails half-way, over three domains."""
    from iommupt_store.domains import domain_alloc, get_domain
    from iommupt_store.errors import AddressInUse

    with m.transaction() as tx:
        a, b = domain_alloc(tx, "x86_64"), domain_alloc(tx, "amdv1")
        a.map_range(0, 0x100001000, 48 << 20)
        a.map_range(100 << 20, 0x1000, 1 << 20)
        b.map_range(1 << 30, 0x200000000, 16 << 20)
        if fail:
            with pytest.raises(AddressInUse):  # installs 52 MiB of tables and leaves, then backs out
                a.map_range(48 << 20, 0x300001000, (52 << 20) + 0x1000)
        a.unmap_range(8 << 20, 4 << 20)
    with m.transaction() as tx:
        c = domain_alloc(tx, "vtdss")
        c.map_range(0, 0x1000, 24 << 20)
        get_domain(tx, b.id).free()
        get_domain(tx, a.id).map_range(8 << 20, 0x400001000, 4 << 20)


@pytest.mark.parametrize("fail", [False, True])
def test_a_small_cache_stores_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: bool) -> None:
    """Writing pages early and dropping them (the cache bound) is invisible: the same calls store
    the same rows, also when a call fails part-way after pages were written early."""
    import iommupt_store.memory as memory

    dumps = []
    for name, pages in (("big", memory.CACHE_PAGES), ("small", 16)):
        monkeypatch.setattr(memory, "CACHE_PAGES", pages)
        with Store.init(tmp_path / f"{name}.db") as store:
            store.create_machine("m", 1 << 30)
            _mixed_work(store.machine("m"), fail=fail)
        dump = sqlite_dump(tmp_path / f"{name}.db")
        dumps.append({t: dump[t] for t in ("page", "mapping_run")})
    assert dumps[0] == dumps[1]
    assert len(dumps[0]["page"]) > 2 * 16  # the small cache really was exceeded


def test_a_finished_transaction_lets_go_of_its_pages(machine: Machine) -> None:
    with machine.transaction() as tx:
        mem = tx.memory
        mem.alloc("test")
        assert mem._cache
    assert not mem._cache
    with pytest.raises(RuntimeError), machine.transaction() as tx:
        mem = tx.memory
        mem.alloc("test")
        raise RuntimeError("abandoned")
    assert not mem._cache
