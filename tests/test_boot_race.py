"""Several processes that are the first of a new boot, started at the same instant.

Each child waits at a start line (a file appearing), then opens the machine. Exactly one of them
must start the new boot (and run the boot-start hooks, once); the others must attach to it. Runs on
SQLite, and on PostgreSQL when ``IOMMUPT_TEST_PG_URL`` names a server.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from iommupt_store.db.models import Boot, Page
from iommupt_store.domains import domain_alloc
from iommupt_store.liveupdate import liveupdate, preserve_domain
from iommupt_store.store import Store
from tests.conftest import SUBPROCESS_TIMEOUT, subprocess_env
from tests.test_postgres import PG_URL, fresh_pg_database

PROCESSES = 4
ROUNDS = 2
HOOK_OWNER = "boot-start-hook"

#: a kernel that waits at the start line, then attaches; a boot-start hook leaves one page as a mark
CHILD = f"""
import sys, time
from pathlib import Path
import iommupt_store.liveupdate  # the model's own hooks run first
from iommupt_store.machine import BOOT_START_HOOKS
from iommupt_store.store import Store

BOOT_START_HOOKS.append(lambda tx, ended, kind: tx.memory.alloc({HOOK_OWNER!r}))
store = Store(sys.argv[1])
go = Path(sys.argv[3])
Path(sys.argv[4]).touch()  # at the start line
while not go.exists():
    time.sleep(0.001)
print(store.machine(sys.argv[2]).boot_number)
"""


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "race.db")
        return
    if not PG_URL:
        pytest.skip("IOMMUPT_TEST_PG_URL is not set")
    with fresh_pg_database() as pg:
        yield pg


def race(url: str, machine: str, tmp_path: Path) -> list[int]:
    """Start PROCESSES children, release them together; returns the boot each one attached to."""
    line = tmp_path / f"race-{time.monotonic_ns()}"
    line.mkdir()
    go = line / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, url, machine, str(go), str(line / f"ready{i}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )
        for i in range(PROCESSES)
    ]
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while len(list(line.glob("ready*"))) < PROCESSES and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break  # a child died before the start: its error is reported below
        time.sleep(0.01)
    go.touch()
    boots = []
    for p in procs:
        out, err = p.communicate(timeout=SUBPROCESS_TIMEOUT)
        assert p.returncode == 0, err[-3000:]
        boots.append(int(out))
    return boots


def boots_and_marks(store: Store, machine: str) -> tuple[list[int], int]:
    """The machine's boot numbers, and how many times a boot-start hook ran."""
    with store.engine.connect() as conn:
        mid = store.machine_id(conn, machine)
        numbers = list(conn.execute(select(Boot.number).where(Boot.machine_id == mid).order_by(Boot.number)).scalars())
        marks = conn.execute(
            select(func.count()).select_from(Page).where(Page.machine_id == mid, Page.owner == HOOK_OWNER)
        ).scalar_one()
    return numbers, marks


def test_first_boot_ever_race(url: str, tmp_path: Path) -> None:
    with Store.init(url) as store:
        for r in range(ROUNDS):
            name = f"race{r}"
            store.create_machine(name, 64 << 20)
            assert race(url, name, tmp_path) == [1] * PROCESSES
            assert boots_and_marks(store, name) == ([1], 0)  # no boot before: no hook


@pytest.mark.parametrize("end", ["liveupdate", "cold"])
def test_first_process_after_reboot_race(url: str, tmp_path: Path, end: str) -> None:
    with Store.init(url) as store:
        store.create_machine("race", 64 << 20)
        machine = store.machine("race")
        for r in range(ROUNDS):
            if end == "liveupdate":
                with machine.transaction() as tx:
                    dom = domain_alloc(tx, "x86_64")
                    dom.map_range(0, 0x100000000, 1 << 20)
                    preserve_domain(tx, dom.id, 0x100)
                liveupdate(machine)
            else:
                machine.reboot(cold=True)
            boot = r + 2
            assert race(url, "race", tmp_path) == [boot] * PROCESSES
            # one new boot, started once: the hooks' mark of the ended boots was freed by each new boot
            assert boots_and_marks(store, "race") == (list(range(1, boot + 1)), 1)
            machine = store.machine("race")
            assert machine.boot_number == boot
