"""Bulk writes and page reads on PostgreSQL: binary COPY, ``= ANY`` key lists, frames kept in their rows.

Runs only when ``IOMMUPT_TEST_PG_URL`` names a server; each test gets a database of its own.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from sqlalchemy import Column, Engine, MetaData, Table, func, select, text
from sqlalchemy.exc import DBAPIError, InternalError

from iommupt_store import Store
from iommupt_store.db.bulk import delete_in, insert_rows, one_of
from iommupt_store.db.engine import make_engine
from iommupt_store.db.types import BigInt, Blob, Flag, Int, Text, Timestamp
from iommupt_store.domains import domain_alloc, list_domains
from iommupt_store.liveupdate import preserve_domain
from tests.test_postgres import PG_URL, fresh_pg_database

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not PG_URL, reason="IOMMUPT_TEST_PG_URL is not set"),
]

md = MetaData()
ROWS = Table(
    "bulk_rows",
    md,
    Column("id", Int, primary_key=True, autoincrement=False),
    Column("big", BigInt),
    Column("data", Blob),
    Column("label", Text(8)),
    Column("flag", Flag),
    Column("at", Timestamp(timezone=True), default=lambda: dt.datetime(2026, 1, 2, tzinfo=dt.UTC)),
)


@pytest.fixture
def engine() -> Iterator[Engine]:
    with fresh_pg_database() as url:
        eng = make_engine(url)
        md.create_all(eng)
        try:
            yield eng
        finally:
            eng.dispose()


def _rows(n: int, **over: object) -> list[dict[str, object]]:
    return [
        {"id": i, "big": i << 40, "data": bytes([i % 256]) * 4096, "label": f"r{i}", "flag": i % 2 == 0, **over}
        for i in range(n)
    ]


def test_copy_writes_every_value_and_the_python_default(engine: Engine) -> None:
    with engine.begin() as conn:
        insert_rows(conn, ROWS, _rows(200))
        got = conn.execute(select(ROWS).order_by(ROWS.c.id)).all()
    assert len(got) == 200
    assert got[7].big == 7 << 40 and got[7].data == b"\x07" * 4096 and got[7].label == "r7"
    assert got[7].flag is False and got[8].flag is True
    assert {r.at for r in got} == {dt.datetime(2026, 1, 2, tzinfo=dt.UTC)}


@pytest.mark.parametrize(
    ("over", "needle"),
    [({"id": 1 << 31}, "out of range"), ({"label": "much too long"}, "too long")],
)
def test_copy_refuses_what_an_insert_refuses(engine: Engine, over: dict[str, object], needle: str) -> None:
    """An integer too large for its column is refused, never wrapped (binary COPY would wrap it)."""
    rows = _rows(100)
    rows[50].update(over)
    with pytest.raises(DBAPIError, match=needle), engine.begin() as conn:
        insert_rows(conn, ROWS, rows)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ROWS)).scalar_one() == 0


def test_one_of_and_delete_in(engine: Engine) -> None:
    with engine.begin() as conn:
        insert_rows(conn, ROWS, _rows(100))
        assert sorted(conn.execute(select(ROWS.c.id).where(one_of(conn, ROWS.c.id, [3, 5, 99, 1000]))).scalars()) == [
            3,
            5,
            99,
        ]
        assert conn.execute(select(ROWS.c.id).where(one_of(conn, ROWS.c.id, []))).all() == []
        delete_in(conn, ROWS, ROWS.c.id, list(range(0, 100, 2)))
        assert conn.execute(select(func.count()).select_from(ROWS)).scalar_one() == 50


def test_frames_stay_in_their_rows_and_read_back_whole() -> None:
    """Revision 0009: a 4 KiB frame is stored uncompressed in its row; preserve reads every frame back."""
    with fresh_pg_database() as url, Store.init(url) as store:
        store.create_machine("m", 1 << 30)
        machine = store.machine("m")
        with machine.transaction() as tx:
            dom = domain_alloc(tx, "x86_64")
            dom.map_range(0, 0x100001000, 8 << 20)
        with machine.transaction() as tx:
            preserve_domain(tx, dom.id, 0x51)
        with make_engine(url).connect() as conn:
            options = conn.execute(text("SELECT reloptions FROM pg_class WHERE relname = 'page'")).scalar_one()
            assert "toast_tuple_target=8160" in options
            sizes = conn.execute(
                text("SELECT DISTINCT pg_column_size(contents), pg_column_compression(contents) FROM page")
            ).all()
            assert sizes and all(size >= 4096 and method is None for size, method in sizes)
            preserved = conn.execute(text("SELECT count(*) FROM preservation")).scalar_one()
            frames = conn.execute(text("SELECT count(*) FROM page WHERE domain_id IS NOT NULL")).scalar_one()
            assert preserved == frames > 0


def test_readers_are_read_only_and_writers_write_again() -> None:
    """Read-only transactions begin READ ONLY on the shared connection; the next writer writes."""
    with fresh_pg_database() as url, Store.init(url) as store:
        store.create_machine("m", 64 << 20)
        observer = store.observe("m")
        with observer.transaction(write=False) as tx, pytest.raises(InternalError, match="read-only transaction"):
            tx.conn.execute(text("UPDATE machine SET mem_bytes = mem_bytes"))
        machine = store.machine("m")
        with machine.transaction() as tx:
            domain_alloc(tx, "x86_64")
        with observer.transaction(write=False) as tx:
            assert len(list_domains(tx)) == 1
            assert tx.conn.execute(text("SHOW transaction_read_only")).scalar_one() == "on"
        with machine.transaction() as tx:
            assert tx.conn.execute(text("SHOW transaction_read_only")).scalar_one() == "off"
