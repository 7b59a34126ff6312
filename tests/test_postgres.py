"""The same code on PostgreSQL: a live update and concurrent writers.

Runs only when ``IOMMUPT_TEST_PG_URL`` names a server (``.ci/run`` starts one
when PostgreSQL is installed); each test gets a database of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

PG_URL = os.environ.get("IOMMUPT_TEST_PG_URL")
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not PG_URL, reason="IOMMUPT_TEST_PG_URL is not set"),
]


@contextlib.contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A new, empty database on the test server (dropped afterwards); yields its URL."""
    psycopg = pytest.importorskip("psycopg")
    assert PG_URL
    admin = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    name = f"iommupt_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    base, _, _ = PG_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_pg_database() as url:
        yield url


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iommupt_store", "--db", url, *args], capture_output=True, text=True, timeout=120
    )


def test_live_update_on_postgres(pg_url: str) -> None:
    assert cli(pg_url, "init", "--mem", "4G").returncode == 0
    dom = json.loads(cli(pg_url, "domain", "create", "x86_64", "--json").stdout)["id"]
    assert cli(pg_url, "map", str(dom), "0xffff800000000000", "0x100001000", "8M").returncode == 0
    before = json.loads(cli(pg_url, "translate", str(dom), "0xffff800000001234", "--json").stdout)
    assert before[0]["phys"] == "0x100002234"
    assert cli(pg_url, "preserve", str(dom), "--token", "9").returncode == 0
    assert cli(pg_url, "liveupdate").returncode == 0
    # boot 2: DMA continuity before restore, then restore, then free
    assert json.loads(cli(pg_url, "translate", str(dom), "0xffff800000001234", "--json").stdout) == before
    restored = json.loads(cli(pg_url, "restore", "--token", "9", "--json").stdout)
    assert restored["state"] == "restored" and restored["frames"] == 7
    again = cli(pg_url, "restore", "--token", "9")
    assert again.returncode == 1 and "EEXIST" in again.stderr
    assert json.loads(cli(pg_url, "translate", str(restored["id"]), "0xffff800000001234", "--json").stdout) == before
    assert cli(pg_url, "domain", "free", str(restored["id"])).returncode == 0
    status = json.loads(cli(pg_url, "status", "--json").stdout)
    assert status["machines"][0]["pages_allocated"] == 0


def test_concurrent_writers_on_postgres(pg_url: str) -> None:
    assert cli(pg_url, "init", "--mem", "1G").returncode == 0
    script = (
        "import sys\n"
        "from iommupt_store import Store\n"
        "m = Store(sys.argv[1]).machine()\n"
        "for _ in range(40):\n"
        "    with m.transaction() as tx:\n"
        "        tx.memory.alloc('test'); tx.memory.alloc('test')\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, pg_url]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    status = json.loads(cli(pg_url, "status", "--json").stdout)
    assert status["machines"][0]["pages_allocated"] == 160


def test_freeing_pages_lowers_the_allocator_hint_on_postgres(pg_url: str) -> None:
    """The statement-level trigger keeps ``machine.free_from`` a lower bound of the free pages."""
    from sqlalchemy import text

    from iommupt_store.store import Store

    store = Store.init(pg_url)
    store.create_machine("m", 64 << 20)
    machine = store.machine("m")
    with machine.transaction() as tx:
        pfns = [tx.memory.alloc("test") for _ in range(8)]

    def free_from() -> int:
        with machine.transaction(write=False) as tx:
            return int(tx.conn.execute(text("SELECT free_from FROM machine")).scalar_one())

    assert free_from() == pfns[-1] + 1
    with machine.transaction() as tx:
        tx.conn.execute(text("DELETE FROM page WHERE pfn IN (:a, :b)"), {"a": pfns[5], "b": pfns[3]})
    assert free_from() == pfns[3]
    with machine.transaction() as tx:
        assert [tx.memory.alloc("test") for _ in range(2)] == [pfns[3], pfns[5]]
    store.close()
