"""The ``mapping`` view stays equal to what the frames translate, through every kind of operation.

Random maps and unmaps on every format (lower and upper halves, every page size,
partial and failed calls), then a live update across processes: preserve, seal,
restore in the next boot, replace, free. After each step the stored runs must be
exactly the maximal runs the hardware walker finds, and ``fsck`` must agree.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from iommupt_store.domains import domain_alloc, get_domain, hardware_walker
from iommupt_store.errors import IommuptError
from iommupt_store.formats.base import Prot
from iommupt_store.fsck import fsck
from iommupt_store.machine import Machine
from iommupt_store.mappings import Run, coalesce, stored_runs, walker_runs
from iommupt_store.store import Store
from tests.conftest import InvokeCli, sql, subprocess_env
from tests.test_postgres import fresh_pg_database

PG_URL = os.environ.get("IOMMUPT_TEST_PG_URL")
SIGN_EXTENDED = {"x86_64", "riscv"}


def assert_ledger(machine: Machine, domain_id: int) -> None:
    with machine.transaction(write=False) as tx:
        found = walker_runs(hardware_walker(tx, domain_id))
        assert stored_runs(tx, domain_id) == found
        assert fsck(tx).problems == []


def churn(machine: Machine, domain_id: int, fmt: str, seed: int, steps: int = 60) -> None:
    rng = random.Random(seed)
    bases = [0, 0x20_0000, 0x4000_0000, 0x7FFF_FFE0_0000, 0x7FFF_FFFF_0000]
    for step in range(steps):
        iova = rng.choice(bases) + rng.randrange(64) * 0x1000 * rng.choice([1, 16, 512])
        if fmt in SIGN_EXTENDED and rng.random() < 0.3:
            iova |= 0xFFFF_8000_0000_0000
        with machine.transaction() as tx:
            dom = get_domain(tx, domain_id)
            try:
                if rng.random() < 0.6:
                    paddr = iova & 0xFF_FFFF_FFFF if rng.random() < 0.5 else rng.randrange(0x10_0000, 1 << 32) & ~0xFFF
                    length = rng.choice(
                        [0x1000, 0x3000, 0x1_0000, 0x20_0000, 0x40_0000, 0x1000 * rng.randrange(1, 700)]
                    )
                    dom.map_range(iova, paddr, length, rng.choice([Prot.READ, Prot.WRITE, Prot.READ | Prot.WRITE]))
                else:
                    dom.unmap_range(iova, rng.choice([0x1000, 0x1_0000, 0x20_0000, 0x1000_0000]))
            except IommuptError:
                pass  # refused calls change nothing, the ledger included (checked below)
        if step % 15 == 14:
            assert_ledger(machine, domain_id)
    assert_ledger(machine, domain_id)


@pytest.mark.parametrize("fmt", ["x86_64", "amdv1", "vtdss", "riscv"])
@pytest.mark.parametrize("seed", [1, 2])
def test_random_maps_and_unmaps(machine: Machine, fmt: str, seed: int) -> None:
    with machine.transaction() as tx:
        domain_id = domain_alloc(tx, fmt).id
    churn(machine, domain_id, fmt, seed)


def test_runs_are_maximal_and_split_where_they_must() -> None:
    a = Run(0x1000, 0x5000, 0x1000, 0x1000, True, True, ("rw",))
    b = Run(0x2000, 0x6000, 0x1000, 0x1000, True, True, ("rw",))
    c = Run(0x3000, 0x9000, 0x1000, 0x1000, True, True, ("rw",))  # not physically contiguous
    d = Run(0x4000, 0xA000, 0x1000, 0x1000, True, False, ())  # other permissions
    assert list(coalesce([a, b, c, d])) == [Run(0x1000, 0x5000, 0x2000, 0x1000, True, True, ("rw",)), c, d]
    crossing = Run((1 << 63) - 0x1000, 0x1000, 0x2000, 0x1000, True, True, ())
    assert [r.iova for r in coalesce([crossing])] == [(1 << 63) - 0x1000, 1 << 63]


def test_map_across_the_halves_is_recorded_at_the_hardware_address(machine: Machine) -> None:
    """The kernel lets a sign-extended range run into the upper half's first top entry."""
    with machine.transaction() as tx:
        dom = domain_alloc(tx, "x86_64")
        dom.map_range(0x7FFF_FFFF_E000, 0x20_0000, 0x4000)
        domain_id = dom.id
    assert_ledger(machine, domain_id)
    with machine.transaction(write=False) as tx:
        assert [r.iova for r in stored_runs(tx, domain_id)] == [0x7FFF_FFFF_E000, 0xFFFF_8000_0000_0000]


BOOT2 = """
import sys
from iommupt_store.store import Store
from iommupt_store import devices
from iommupt_store.domains import domain_alloc, hardware_walker
from iommupt_store.fsck import fsck
from iommupt_store.liveupdate import restore_domain, retrieve_session
from iommupt_store.mappings import stored_runs, walker_runs

m = Store(sys.argv[1]).machine()
with m.transaction() as tx:
    # boot 2 before restore: the preserved domain's runs are still its own and still true
    assert stored_runs(tx, 1) == walker_runs(hardware_walker(tx, 1)) != []
    retrieve_session(tx, "s")
    dom = restore_domain(tx, 0x10)
    assert stored_runs(tx, 1) == []
    assert stored_runs(tx, dom.id) == walker_runs(hardware_walker(tx, dom.id))
    new = domain_alloc(tx, "vtdss")
    new.map_range(0x0, 0x1_2000_0000, 0x4000)
    devices.replace(tx, "0000:3b:00.1", new.id, owner="vm")  # frees the restored domain
    assert stored_runs(tx, dom.id) == []
    assert fsck(tx).problems == []
print("ok")
"""


def _live_update(url: str) -> None:
    from iommupt_store import devices
    from iommupt_store.liveupdate import create_session, liveupdate, preserve_device, preserve_domain_in_session

    store = Store(url)
    m = store.machine()
    with m.transaction() as tx:
        dom = domain_alloc(tx, "vtdss")
        dom.map_range(0x0, 0x1_0000_0000, 0x30_0000)
        dom.map_range(0x4000_0000, 0x1_4000_1000, 0x5000, Prot.READ)
        other = domain_alloc(tx, "x86_64")  # not preserved: freed by boot 2
        other.map_range(0x0, 0x1_8000_0000, 0x2000)
        devices.attach(tx, "0000:3b:00.1", dom.id, owner="vm")
        create_session(tx, "s")
        preserve_domain_in_session(tx, "s", dom.id, 0x10)
        preserve_device(tx, "s", "0000:3b:00.1", 0x11)
    assert_ledger(m, 1)
    liveupdate(m)
    r = subprocess.run(
        [sys.executable, "-c", BOOT2, url], capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    m = Store(url).observe()
    with m.transaction(write=False) as tx:
        assert stored_runs(tx, 2) == []  # boot 2 freed the unpreserved domain, and its runs


def test_live_update_moves_and_drops_runs(db_path: Path) -> None:
    Store.init(db_path).create_machine("default", 1 << 30)
    _live_update(str(db_path))


@pytest.mark.postgres
@pytest.mark.skipif(not PG_URL, reason="IOMMUPT_TEST_PG_URL is not set")
def test_live_update_moves_and_drops_runs_on_postgres() -> None:
    with fresh_pg_database() as url:
        Store.init(url).create_machine("default", 1 << 30)
        _live_update(url)
        import psycopg

        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            views = conn.execute("SELECT count(*) FROM mapping").fetchone()
            frames = conn.execute("SELECT count(*) FROM table_frame WHERE NOT preserved").fetchone()
        assert views is not None and views[0] == 1  # the VMM's new domain
        assert frames is not None and frames[0] > 0


def test_revision_0006_fills_the_ledger_and_preservation_domains(cli: InvokeCli, db_path: Path) -> None:
    """A store preserved before 0006 gets its runs and preservation domains when upgraded."""
    for args in (
        ["--kernel", "lu-v3", "init", "--mem", "1G"],  # a handover revision 0007 can drop without loss
        ["domain", "create", "x86_64"],
        ["map", "1", "0x0", "0x40000000", "8K"],
        ["map", "1", "0xffff800000000000", "0x80000000", "2M"],
        ["preserve", "1", "--token", "1"],
        ["db", "downgrade", "0005"],
        ["db", "upgrade"],
    ):
        assert cli(*args).exit_code == 0, args
    assert sql(db_path, "SELECT DISTINCT domain_id FROM preservation") == [(1,)]
    assert sorted(r[0] for r in sql(db_path, "SELECT level FROM preservation")) == [0, 1, 1, 2, 2, 3]
    machine = Store(db_path).observe()
    assert_ledger(machine, 1)
    with machine.transaction(write=False) as tx:
        assert [r.size for r in stored_runs(tx, 1)] == [0x2000, 0x20_0000]
