"""Whole-domain verification (``verify_domain``): the same answer as the hardware walker, as runs.

Random maps and unmaps on every format must verify clean against the ledger
and against the walker's own runs given as an expectation; a wrong
expectation, a tampered frame and a tampered ledger must come back as the
differing runs, joined and capped; a broken table structure is bad data.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from iommupt_store.domains import domain_alloc, get_domain, hardware_walker
from iommupt_store.errors import BadData, InvalidArgument, NotFound
from iommupt_store.formats.base import Prot
from iommupt_store.machine import Machine
from iommupt_store.mappings import walker_runs
from iommupt_store.store import Store
from iommupt_store.verify import ExpectedRun, parse_expectation, verify_domain
from tests.conftest import InvokeCli, one_error_line, sql
from tests.test_mapping_ledger import churn
from tests.test_postgres import fresh_pg_database

PG_URL = os.environ.get("IOMMUPT_TEST_PG_URL")
RW = Prot.READ | Prot.WRITE


def walker_expectation(machine: Machine, domain_id: int) -> tuple[list[ExpectedRun], int]:
    """The walker's runs as an expectation (prot from the leaf's rights) and their byte count."""
    with machine.transaction(write=False) as tx:
        runs = walker_runs(hardware_walker(tx, domain_id))
        fmt = get_domain(tx, domain_id).pt.fmt
    out = []
    for r in runs:
        prot = (Prot.READ if r.readable else 0) | (Prot.WRITE if r.writable else 0)
        if fmt.name == "x86_64" and not r.writable:
            prot = Prot.READ
        out.append(ExpectedRun(iova=r.iova, phys=r.phys, length=r.size, prot=prot))
    return out, sum(r.size for r in runs)


@pytest.mark.parametrize("fmt", ["x86_64", "amdv1", "vtdss", "riscv"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_domains_verify_clean(machine: Machine, fmt: str, seed: int) -> None:
    with machine.transaction() as tx:
        domain_id = domain_alloc(tx, fmt).id
    churn(machine, domain_id, fmt, seed, steps=40)
    expected, total = walker_expectation(machine, domain_id)
    with machine.store.observe(machine.name).transaction(write=False) as tx:
        report = verify_domain(tx, domain_id)
        given = verify_domain(tx, domain_id, expected)
    assert report.ok and report.differences == [] and report.differences_total == 0, report
    assert report.summary.bytes_mapped == report.summary.bytes_matching == total
    assert report.summary.translations == total // 4096
    assert report.summary.frames_read == report.summary.frames_stored
    assert given.ok, given
    assert given.summary.bytes_expected == total


def test_contiguous_entries_are_one_leaf_each(machine: Machine) -> None:
    """amdv1 size-coded pages and riscv Svnapot: one entry over many items, runs joined across entries."""
    with machine.transaction() as tx:
        amd = domain_alloc(tx, "amdv1")
        amd.map_range(0x10_0000, 0x4000_0000, 0x40000, RW)  # one 256 KiB entry
        rv = domain_alloc(tx, "riscv", features=["SIGN_EXTEND", "RISCV_SVNAPOT_64K"])
        rv.map_range(0x10_0000, 0x4000_0000, 0x40000, RW)
        for dom in (amd, rv):  # one more 64 KiB entry that continues the run
            dom.map_range(0x14_0000, 0x4004_0000, 0x10000, RW)
        ids = amd.id, rv.id
    with machine.transaction(write=False) as tx:
        for domain_id in ids:
            report = verify_domain(tx, domain_id)
            assert report.ok, report
            entries = len(hardware_walker(tx, domain_id).leaf_entries())
            assert report.summary.leaf_entries == entries == (2 if domain_id == ids[0] else 5)
            assert report.summary.runs_found == 1
            assert report.summary.bytes_mapped == 0x50000


def test_differences_are_runs(machine: Machine) -> None:
    with machine.transaction() as tx:
        dom = domain_alloc(tx, "x86_64")
        dom.map_range(0x0, 0x100_0000, 0x40_0000, RW)  # 4 MiB: two 2 MiB pages
        dom.map_range(0x80_0000, 0x900_0000, 0x3000, Prot.READ)
        domain_id = dom.id
    expect = [
        ExpectedRun(iova=0x0, phys=0x100_0000, length=0x20_0000, prot="rw"),  # right
        ExpectedRun(iova=0x20_0000, phys=0x500_0000, length=0x20_0000, prot="rw"),  # wrong phys
        ExpectedRun(iova=0x80_0000, phys=0x900_0000, length=0x4000, prot="rw"),  # wrong rights, 1 page missing
        ExpectedRun(iova=0x1_0000_0000, phys=0x0, length=0x1000, prot="r"),  # missing
    ]
    with machine.transaction(write=False) as tx:
        report = verify_domain(tx, domain_id, expect)
        capped = verify_domain(tx, domain_id, expect, max_differences=1)
        empty = verify_domain(tx, domain_id, [])
    assert not report.ok
    got = [(d.kind, d.iova, d.length, d.expected_phys, d.found_phys) for d in report.differences]
    assert got == [
        ("wrong_phys", 0x20_0000, 0x20_0000, 0x500_0000, 0x120_0000),
        ("wrong_permissions", 0x80_0000, 0x3000, 0x900_0000, 0x900_0000),
        ("missing", 0x80_3000, 0x1000, 0x900_3000, None),
        ("missing", 0x1_0000_0000, 0x1000, 0x0, None),
    ]
    assert report.differences[1].expected_prot == "rw" and report.differences[1].found_prot == "r-"
    assert report.summary.bytes_matching == 0x20_0000
    assert capped.differences_total == 4 and len(capped.differences) == 1
    assert [(d.kind, d.iova, d.length) for d in empty.differences] == [
        ("unexpected", 0x0, 0x40_0000),
        ("unexpected", 0x80_0000, 0x3000),
    ]
    assert report.model_dump(mode="json")["differences"][0]["iova"] == "0x200000"


def test_tampered_frame_and_ledger_show_up(machine: Machine, db_path: object) -> None:
    with machine.transaction() as tx:
        dom = domain_alloc(tx, "x86_64")
        dom.map_range(0x0, 0x100_0000, 0x10_0000, RW)  # 256 4 KiB pages
        domain_id = dom.id
        top_pfn = dom.pt.top_phys >> 12
    # find the level-0 table and point its item 5 elsewhere
    (pfn, contents) = sql(db_path, "SELECT pfn, contents FROM page WHERE domain_id = ? AND level = 0", domain_id)[0]
    raw = struct.unpack_from("<Q", contents, 5 * 8)[0]
    changed = bytearray(contents)
    struct.pack_into("<Q", changed, 5 * 8, raw + 0x1000_0000)
    sql(db_path, "UPDATE page SET contents = ? WHERE pfn = ?", bytes(changed), pfn)
    sql(
        db_path,
        "UPDATE mapping_run SET size = size + 4096, last_iova = last_iova + 4096 WHERE domain_id = ?",
        domain_id,
    )
    assert top_pfn != pfn
    with machine.transaction(write=False) as tx:
        report = verify_domain(tx, domain_id)
    assert [(d.kind, d.iova, d.length) for d in report.differences] == [
        ("wrong_phys", 0x5000, 0x1000),
        ("missing", 0x10_0000, 0x1000),
    ]


def test_broken_structure_is_bad_data(machine: Machine, db_path: object) -> None:
    with machine.transaction() as tx:
        dom = domain_alloc(tx, "x86_64")
        dom.map_range(0x0, 0x100_0000, 0x1000, RW)
        domain_id = dom.id
    sql(db_path, "UPDATE page SET domain_id = NULL, level = NULL WHERE domain_id = ? AND level = 0", domain_id)
    with machine.transaction(write=False) as tx, pytest.raises(BadData, match="not a frame of this domain"):
        verify_domain(tx, domain_id)


def test_refusals(machine: Machine) -> None:
    with machine.transaction() as tx:
        dom = domain_alloc(tx, "vtdss")
        domain_id = dom.id
        gone = domain_alloc(tx, "x86_64")
        gone.free()
    with machine.transaction(write=False) as tx:
        with pytest.raises(NotFound):
            verify_domain(tx, 999)
        with pytest.raises(NotFound, match="freed"):
            verify_domain(tx, gone.id)
        with pytest.raises(InvalidArgument, match="ascending"):
            verify_domain(
                tx,
                domain_id,
                [ExpectedRun(iova=0x2000, phys=0, length=0x1000), ExpectedRun(iova=0x1000, phys=0, length=0x1000)],
            )
        with pytest.raises(InvalidArgument, match="READ or WRITE"):
            verify_domain(tx, domain_id, [ExpectedRun(iova=0x0, phys=0, length=0x1000, prot=Prot.CACHE)])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ('{"iova": 0}', "list"),
        ('[{"iova": "0x1000", "phys": 0}]', "length"),
        ('[{"iova": "zz", "phys": 0, "length": 1}]', "not a number"),
        ('[{"iova": -1, "phys": 0, "length": 1}]', "0.iova"),
        ('[{"iova": 0, "phys": 0, "length": 1, "prot": "rq"}]', "permission letter"),
        ('[{"iova": 0, "phys": 0, "length": 1, "extra": 1}]', "extra"),
        ('[{"iova": "0xffffffffffffffff", "phys": 0, "length": "8K"}]', "past the end"),
    ],
)
def test_bad_expectations_are_one_line(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as err:
        parse_expectation(text)
    assert "\n" not in str(err.value)


def test_expectation_format() -> None:
    runs = parse_expectation(
        '[{"iova": "0x1000", "phys": 4096, "length": "2M", "prot": "r"}, {"iova": 0, "phys": 0, "length": 1}]'
    )
    assert runs[0] == ExpectedRun(iova=0x1000, phys=0x1000, length=2 << 20, prot=Prot.READ)
    assert runs[1].prot == RW


@pytest.mark.postgres
@pytest.mark.skipif(not PG_URL, reason="IOMMUPT_TEST_PG_URL not set")
def test_postgres_verify() -> None:
    assert PG_URL
    with fresh_pg_database() as url:
        Store.init(url).close()
        with Store(url) as store:
            store.create_machine("pg", 1 << 32)
            machine = store.machine("pg")
            with machine.transaction() as tx:
                domain_id = domain_alloc(tx, "x86_64").id
            churn(machine, domain_id, "x86_64", 7, steps=25)
            expected, total = walker_expectation(machine, domain_id)
            with store.observe("pg").transaction(write=False) as tx:
                assert verify_domain(tx, domain_id).ok
                assert verify_domain(tx, domain_id, expected).summary.bytes_matching == total


# -- the command ---------------------------------------------------------------------------------------


def test_command(cli: InvokeCli, tmp_path: Path) -> None:
    for args in (["init", "--mem", "8G"], ["domain", "create", "x86_64"], ["map", "1", "0x0", "0x100000000", "4M"]):
        assert cli(*args).exit_code == 0
    ok = cli("verify", "1")
    assert ok.exit_code == 0, ok.stderr
    assert "1024 translation(s)" in ok.stdout and "every translation matches" in ok.stdout
    runs = tmp_path / "runs.json"
    runs.write_text(
        '[{"iova": "0x0", "phys": "0x100000000", "length": "2M"}, {"iova": "2M", "phys": 0, "length": "2M"}]'
    )
    bad = cli("verify", "1", "--expect", str(runs), "--json")
    assert bad.exit_code == 1
    doc = json.loads(bad.stdout)
    assert doc["differences"] == [
        {
            "kind": "wrong_phys",
            "iova": "0x200000",
            "length": 2 << 20,
            "expected_phys": "0x0",
            "found_phys": "0x100200000",
            "expected_prot": "rw",
            "found_prot": "rw",
        }
    ]
    assert doc["differences_total"] == 1 and doc["summary"]["bytes_matching"] == 2 << 20
    table = cli("verify", "1", "--expect", str(runs), "--max-differences", "0")
    assert table.exit_code == 1 and "1 differing run(s), the first 0 listed" in table.stdout
    runs.write_text('[{"iova": "0x0", "phys": "0x100000000"}]')
    usage = cli("verify", "1", "--expect", str(runs))
    assert usage.exit_code == 2
    assert one_error_line(usage.stderr) == (
        "error: usage: Invalid value for --expect: expectation run 0.length: Field required "
        "(see 'iommupt-store verify --help')"
    )
    assert cli("verify", "7").exit_code == 1
