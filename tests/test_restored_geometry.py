"""A restored domain reports the page sizes of the geometry it was handed, as a fresh one would."""

from __future__ import annotations

from typing import Any

import pytest

from iommupt_store.domains import domain_alloc, get_domain
from iommupt_store.liveupdate import liveupdate, preserve_domain, restore_domain

TOKEN = 0x42

CASES: list[tuple[str, dict[str, Any]]] = [
    ("riscv", {"vasz": 39}),
    ("riscv", {"vasz": 57}),
    ("x86_64", {"top_level": 4, "vasz": 57}),
    ("vtdss", {"top_level": 2, "vasz": 39}),
    ("amdv1", {"top_level": 1, "vasz": 48}),
]


def restore_and_report(machine: Any) -> list[int]:
    """Boot 2: the restored domain's page sizes, in memory and re-read from the database, and those of
    a fresh domain of the restored geometry (format, top level, VA size, features)."""
    with machine.transaction() as tx:
        dom = restore_domain(tx, TOKEN)
        live = dom.info()
    with machine.transaction() as tx:
        stored = get_domain(tx, dom.id).info()
        fresh = domain_alloc(
            tx, stored.format, top_level=stored.top_level, vasz=stored.max_vasz_lg2, features=stored.features
        ).info()
    return [live.pgsize_bitmap, stored.pgsize_bitmap, fresh.pgsize_bitmap]


@pytest.mark.parametrize(("fmt", "options"), CASES, ids=[f"{f}-{o}" for f, o in CASES])
def test_restored_pgsize_bitmap_matches_a_fresh_domain(
    iommupt_machine: Any, iommupt_boot: Any, fmt: str, options: dict[str, Any]
) -> None:
    with iommupt_machine.transaction() as tx:
        dom = domain_alloc(tx, fmt, **options)
        dom.map_range(0x40000000, 0x40000000, 0x200000)
        preserve_domain(tx, dom.id, TOKEN)
    liveupdate(iommupt_machine)
    live, stored, fresh = iommupt_boot.run(restore_and_report, expect_boot=2)
    assert live == stored == fresh


def test_riscv_sv39_restored_offers_no_512g_page(iommupt_machine: Any, iommupt_boot: Any) -> None:
    with iommupt_machine.transaction() as tx:
        dom = domain_alloc(tx, "riscv", vasz=39)
        preserve_domain(tx, dom.id, TOKEN)
    liveupdate(iommupt_machine)
    live, stored, fresh = iommupt_boot.run(restore_and_report, expect_boot=2)
    assert live == stored == fresh == 0x40201000  # 4K, 2M, 1G; the default Sv48 domain would add 512G
